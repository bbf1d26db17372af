"""Who takes part in a phase: the membership epochs of a run that loses (or regains) sites.

Framework-free. The run starts with every rank in epoch 0 on the configured graph and W.
When sites are lost, the coordinator starts a new epoch over the survivors: the graph is the
induced subgraph on them and W is rebuilt with the same mixing rule (e.g.
Metropolis-Hastings) on that subgraph, so it stays symmetric and doubly stochastic over the
members. Ranks keep their identity (partition-id, data, state store); a gossip group numbers
its members 0..m-1 in rank order (`group_rank`).
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import torch

from deca_flower.topology import mixing_matrix, neighbours, spectral_gap


class MembershipError(RuntimeError):
    """The survivors cannot go on (disconnected, or too few); the message names them."""


@dataclass(frozen=True)
class Membership:
    epoch: int
    members: tuple[int, ...]  # ranks, ascending
    graph: nx.Graph  # over ranks: the full graph induced on the members
    weights: torch.Tensor  # (n, n) over all ranks; rows and columns of non-members are 0

    @property
    def lost(self) -> tuple[int, ...]:
        return tuple(r for r in range(self.weights.shape[0]) if r not in self.members)

    def group_rank(self, rank: int) -> int:
        return self.members.index(rank)

    def neighbours(self, rank: int) -> list[int]:
        return neighbours(self.graph, rank)

    def spectral_gap(self) -> float:
        idx = torch.tensor(self.members)
        return spectral_gap(self.weights[idx][:, idx])

    def record(self) -> dict:
        return {
            "epoch": self.epoch,
            "members": list(self.members),
            "lost": list(self.lost),
            "spectral_gap": self.spectral_gap(),
            "mixing_matrix": self.weights.tolist(),
        }


def full_membership(graph: nx.Graph, weights: torch.Tensor) -> Membership:
    return Membership(0, tuple(sorted(graph.nodes)), graph, weights)


def without(
    current: Membership, lost: set[int], full_graph: nx.Graph, rule: str, min_peers: int
) -> Membership:
    """The next epoch: `current` minus `lost`, W rebuilt by `rule` on the survivors' graph."""
    members = tuple(r for r in current.members if r not in lost)
    n = full_graph.number_of_nodes()
    if len(members) < max(min_peers, 2):
        raise MembershipError(
            f"only {len(members)} site(s) {list(members)} remain after losing {sorted(lost)}; "
            f"faults.min_peers={min_peers} (and DECA needs at least 2)"
        )
    graph = full_graph.subgraph(members).copy()
    if not nx.is_connected(graph):
        parts = sorted(sorted(c) for c in nx.connected_components(graph))
        raise MembershipError(
            f"without rank(s) {sorted(lost)} the surviving graph falls apart into {parts}: "
            "their blocks could never reach consensus"
        )
    return Membership(current.epoch + 1, members, graph, _embedded_weights(graph, n, rule))


def restored(current: Membership, full_graph: nx.Graph, full_weights: torch.Tensor) -> Membership:
    """The next epoch with every rank back on the original graph and W."""
    return Membership(current.epoch + 1, tuple(sorted(full_graph.nodes)), full_graph, full_weights)


def _embedded_weights(graph: nx.Graph, n: int, rule: str) -> torch.Tensor:
    """`rule`'s W on `graph` (nodes: a subset of ranks), placed in an n x n matrix."""
    members = sorted(graph.nodes)
    compact = nx.relabel_nodes(graph, {r: i for i, r in enumerate(members)})
    w = mixing_matrix(compact, rule)
    out = torch.zeros((n, n), dtype=w.dtype)
    idx = torch.tensor(members)
    out[idx.unsqueeze(1), idx.unsqueeze(0)] = w
    return out


def with_members(
    current: Membership,
    members: set[int],
    full_graph: nx.Graph,
    full_weights: torch.Tensor,
    rule: str,
) -> Membership:
    """The next epoch over `members`: the original graph and W once every rank is back,
    else W rebuilt by `rule` on the graph induced on them."""
    if set(members) == set(full_graph.nodes):
        return restored(current, full_graph, full_weights)
    graph = full_graph.subgraph(sorted(members)).copy()
    if not nx.is_connected(graph):
        raise MembershipError(f"ranks {sorted(members)} are not connected on the graph")
    n = full_graph.number_of_nodes()
    return Membership(current.epoch + 1, tuple(sorted(members)), graph,
                      _embedded_weights(graph, n, rule))  # fmt: skip


def heal_donor(rank: int, current: Membership, full_graph: nx.Graph) -> int:
    """Who gives a returning `rank` the blocks it missed: its lowest-ranked neighbour (on the
    full graph) that is a member, else the lowest-ranked member. The coordinator and the
    engine's replay use this same rule."""
    live = [j for j in neighbours(full_graph, rank) if j in current.members]
    return min(live) if live else min(current.members)
