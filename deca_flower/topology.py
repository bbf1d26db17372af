"""Communication graphs and gossip mixing matrices for DECA.

DECA's clients sit on an undirected connected graph ``G`` and, after every inner
step, replace their active block by ``x_i = sum_j w_ij * x_half_j`` (eq. 7 of
the algorithm spec). This module builds ``G`` (nodes are always the client ranks
``0..n-1``) and the mixing matrix ``W``, and checks invariant 13 of the spec:
``W`` symmetric, non-negative, rows and columns summing to 1, non-zero exactly on
the edges and the diagonal, and spectral gap ``1 - max(|lambda_2|, |lambda_n|) > 0``.

Every user-facing error is a :class:`TopologyError` whose message names the config
setting to change (``topology.name``, ``topology.p``, ``topology.path``,
``topology.mixing`` or ``num_clients``). No Flower import here on purpose: the
graph code must be testable and usable without a federation.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import networkx as nx
import numpy as np
import torch

__all__ = [
    "MIXING_RULES",
    "TOPOLOGIES",
    "TopologyError",
    "build_graph",
    "describe",
    "mixing_matrix",
    "neighbours",
    "spectral_gap",
    "torus_shape",
    "validate_mixing_matrix",
]

TOPOLOGIES: tuple[str, ...] = (
    "ring",
    "er",
    "complete",
    "bipartite",
    "random_bipartite",
    "torus",
    "star",
    "file",
)
MIXING_RULES: tuple[str, ...] = ("metropolis", "uniform")


class TopologyError(ValueError):
    """A graph or mixing matrix that DECA cannot use; the message names the setting to fix."""


# --------------------------------------------------------------------------- graphs


def build_graph(
    name: str,
    num_clients: int,
    *,
    p: float = 0.5,
    seed: int = 0,
    path: str | None = None,
    max_tries: int = 1000,
) -> nx.Graph:
    """Build the connected communication graph ``name`` on nodes ``0..num_clients-1``.

    ``p`` and ``seed`` are used by the random topologies (``er``, ``random_bipartite``),
    ``path`` by ``file``. The result carries ``graph.graph["name"]`` for :func:`describe`.
    """
    key = str(name).strip().lower()
    if key not in TOPOLOGIES:
        raise TopologyError(
            f"unknown topology {name!r}: set topology.name to one of {', '.join(TOPOLOGIES)}"
        )
    n = _check_num_clients(num_clients)
    raw = _generate(key, n, p=p, seed=seed, path=path, max_tries=max_tries)
    # Plain, unfrozen copy whatever the generator returned; keep only
    # the attributes we set (generators add their own "name" strings).
    graph = nx.empty_graph(n)  # nodes iterate in rank order 0..n-1
    graph.add_edges_from(raw.edges)
    graph.graph.update(name=key, attempts=raw.graph.get("attempts", 1))
    _require_connected(graph, key)
    return graph


def _generate(
    key: str, n: int, *, p: float, seed: int, path: str | None, max_tries: int
) -> nx.Graph:
    if key == "ring":
        return _ring(n)
    if key == "er":
        return _er(n, p, seed, max_tries)
    if key == "complete":
        return nx.complete_graph(n)
    if key == "bipartite":
        return _bipartite(n)
    if key == "random_bipartite":
        return _random_bipartite(n, p, seed, max_tries)
    if key == "torus":
        return _torus(n)
    if key == "star":
        return nx.star_graph(n - 1)  # n nodes, node 0 is the hub
    return _from_file(path, n)


def _check_num_clients(num_clients: int) -> int:
    if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)):
        raise TopologyError(f"num_clients must be an integer, got {num_clients!r}")
    if num_clients < 1:
        raise TopologyError(f"num_clients must be >= 1, got {num_clients}")
    return int(num_clients)


def _check_p(p: float) -> float:
    try:
        value = float(p)
    except (TypeError, ValueError):
        raise TopologyError(f"topology.p must be a number in (0, 1], got {p!r}") from None
    if not 0.0 < value <= 1.0:
        raise TopologyError(f"topology.p must be in (0, 1], got {p!r}")
    return value


def _check_max_tries(max_tries: int) -> int:
    if isinstance(max_tries, bool) or not isinstance(max_tries, (int, np.integer)):
        raise TopologyError(f"topology.max_tries must be an integer, got {max_tries!r}")
    if max_tries < 1:
        raise TopologyError(f"topology.max_tries must be >= 1, got {max_tries}")
    return int(max_tries)


def _ring(n: int) -> nx.Graph:
    if n < 2:
        raise TopologyError(
            "topology.name='ring' needs num_clients >= 2; use topology.name='complete' "
            "for a single client"
        )
    # Built explicitly so that n == 2 is one edge and n == 3 a triangle, with no multi-edges.
    graph = nx.empty_graph(n)
    graph.add_edges_from((i, (i + 1) % n) for i in range(n) if i != (i + 1) % n)
    return graph


def _er(n: int, p: float, seed: int, max_tries: int) -> nx.Graph:
    p = _check_p(p)
    # One Python RNG stream seeded once: attempt k is a deterministic function of
    # (seed, k), and nearby seeds do not share attempts (unlike seed + k).
    rng = random.Random(seed)
    for attempt in range(1, _check_max_tries(max_tries) + 1):
        graph = nx.gnp_random_graph(n, p, seed=rng)
        if nx.is_connected(graph):
            graph.graph["attempts"] = attempt  # logged: how often we resampled
            return graph
    threshold = math.log(n) / n
    raise TopologyError(
        f"Erdos-Renyi G(n={n}, p={p}) was disconnected in all {max_tries} samples "
        f"(seed {seed}); raise topology.p (connectivity needs p well above "
        f"ln(n)/n = {threshold:.3f})"
    )


def _halves(n: int, name: str) -> tuple[int, int]:
    if n < 2:
        raise TopologyError(f"topology.name={name!r} needs num_clients >= 2, got {n}")
    return (n + 1) // 2, n // 2


def _bipartite(n: int) -> nx.Graph:
    # Nodes 0..a-1 form one side and a..n-1 the other.
    a, b = _halves(n, "bipartite")
    return nx.complete_bipartite_graph(a, b)


def _random_bipartite(n: int, p: float, seed: int, max_tries: int) -> nx.Graph:
    a, b = _halves(n, "random_bipartite")
    p = _check_p(p)
    rng = random.Random(seed)
    for attempt in range(1, _check_max_tries(max_tries) + 1):
        graph = nx.bipartite.random_graph(a, b, p, seed=rng)
        if nx.is_connected(graph):
            graph.graph["attempts"] = attempt
            return graph
    raise TopologyError(
        f"random bipartite graph ({a} + {b} nodes, p={p}) was disconnected in all "
        f"{max_tries} samples (seed {seed}); raise topology.p"
    )


def torus_shape(n: int) -> tuple[int, int] | None:
    """Most square ``(rows, cols)`` with ``rows * cols == n`` and both >= 3, else None."""
    # Sides of 2 would make the wrap-around edge coincide with the inner one, so a
    # "torus" would lose its 4-regularity; sides >= 3 keep every node at degree 4.
    for rows in range(math.isqrt(n), 2, -1):
        if n % rows == 0 and n // rows >= 3:
            return rows, n // rows
    return None


def _torus(n: int) -> nx.Graph:
    shape = torus_shape(n)
    if shape is None:
        below = next((m for m in range(n - 1, 8, -1) if torus_shape(m)), None)
        above = next(m for m in range(max(n + 1, 9), 2 * n + 10) if torus_shape(m))
        nearest = f"{below} or {above}" if below is not None else f"{above}"
        raise TopologyError(
            f"topology.name='torus' needs num_clients = rows * cols with rows, cols >= 3 "
            f"(9, 12, 15, 16, 18, 20, 21, 24, 25, ...); got num_clients={n}, nearest "
            f"valid: {nearest}. Change num_clients or topology.name"
        )
    rows, cols = shape
    grid = nx.grid_2d_graph(rows, cols, periodic=True)
    # Row-major relabelling so that client rank r sits at (r // cols, r % cols).
    return nx.relabel_nodes(grid, {(r, c): r * cols + c for r, c in grid.nodes})


def _from_file(path: str | None, n: int) -> nx.Graph:
    if path is None or str(path).strip() == "":
        raise TopologyError("topology.name='file' needs topology.path (an edge-list file)")
    file = Path(path)
    if not file.is_file():
        raise TopologyError(f"topology.path={str(path)!r} is not a readable file")
    try:
        graph = nx.read_edgelist(file, comments="#", nodetype=int, data=False)
    except (TypeError, ValueError, UnicodeDecodeError) as err:
        raise TopologyError(
            f"topology.path={str(path)!r}: cannot parse edge list ({err}); expected "
            "lines 'i j' with integer client ranks, '#' starts a comment"
        ) from err
    loops = sorted(u for u, v in nx.selfloop_edges(graph))
    if loops:
        raise TopologyError(
            f"topology.path={str(path)!r} has self-loops on nodes {loops}; remove the "
            "'i i' lines (a client's own weight w_ii comes from the mixing rule)"
        )
    nodes = set(graph.nodes)
    expected = set(range(n))
    if nodes != expected:
        missing = sorted(expected - nodes)
        extra = sorted(nodes - expected)
        raise TopologyError(
            f"topology.path={str(path)!r} must use exactly the nodes 0..{n - 1} "
            f"(num_clients={n}), each in at least one edge; missing {missing}, "
            f"unexpected {extra}. Fix the file or num_clients"
        )
    return graph


def _require_connected(graph: nx.Graph, name: str) -> None:
    if graph.number_of_nodes() == 0 or nx.is_connected(graph):
        return
    parts = [sorted(c) for c in nx.connected_components(graph)]
    setting = {"file": "topology.path", "er": "topology.p", "random_bipartite": "topology.p"}
    raise TopologyError(
        f"topology {name!r} is disconnected ({len(parts)} components: {parts}); gossip "
        f"cannot reach consensus. Change {setting.get(name, 'topology.name')}"
    )


def neighbours(graph: nx.Graph, i: int) -> list[int]:
    """Sorted neighbour ranks of client ``i`` (itself excluded)."""
    if i not in graph:
        raise TopologyError(f"client {i} is not a node of the graph (0..{len(graph) - 1})")
    return sorted(int(j) for j in graph.neighbors(i) if j != i)


# --------------------------------------------------------------------------- mixing


def _check_graph_nodes(graph: nx.Graph) -> int:
    n = graph.number_of_nodes()
    if n == 0:
        raise TopologyError("the graph has no nodes; num_clients must be >= 1")
    if set(graph.nodes) != set(range(n)):
        raise TopologyError(f"graph nodes must be exactly 0..{n - 1}, got {sorted(graph.nodes)}")
    if nx.number_of_selfloops(graph):
        raise TopologyError("graph has self-loops; w_ii comes from the mixing rule, remove them")
    return n


def mixing_matrix(graph: nx.Graph, rule: str = "metropolis") -> torch.Tensor:
    """Symmetric doubly stochastic float64 ``(n, n)`` gossip matrix for ``graph``.

    ``metropolis``: ``w_ij = 1/(1+max(deg_i, deg_j))`` on edges; ``uniform``:
    ``w_ij = 1/(d_max+1)``; both set ``w_ii = 1 - sum_j w_ij``, which is > 0 so the
    chain is aperiodic and the spectral gap is positive on any connected graph.
    """
    key = str(rule).strip().lower()
    if key not in MIXING_RULES:
        raise TopologyError(
            f"unknown mixing rule {rule!r}: set topology.mixing to one of {', '.join(MIXING_RULES)}"
        )
    n = _check_graph_nodes(graph)
    deg = np.array([graph.degree(i) for i in range(n)], dtype=np.float64)
    d_max = deg.max() if n else 0.0
    w = np.zeros((n, n), dtype=np.float64)
    for i, j in graph.edges:
        weight = 1.0 / (1.0 + max(deg[i], deg[j])) if key == "metropolis" else 1.0 / (d_max + 1)
        w[i, j] = w[j, i] = weight
    np.fill_diagonal(w, 1.0 - w.sum(axis=1))
    return torch.from_numpy(w)


def spectral_gap(W: torch.Tensor) -> float:
    """``1 - max(|lambda_2|, |lambda_n|)`` of a symmetric ``W`` (1.0 for a single client)."""
    w = _as_matrix(W)
    if not torch.allclose(w, w.T, rtol=0.0, atol=1e-10):
        raise TopologyError("spectral_gap needs a symmetric W (eigenvalues must be real)")
    return _gap(w)


def _gap(w: torch.Tensor) -> float:
    if w.shape[0] == 1:
        return 1.0  # one client is trivially at consensus
    # eigvalsh sees only a symmetric matrix, returns real eigenvalues sorted ascending:
    # lambda_n first, lambda_1 (= 1 for doubly stochastic W) last.
    eig = torch.linalg.eigvalsh((w + w.T) / 2)
    return float(1.0 - max(abs(eig[-2].item()), abs(eig[0].item())))


def _as_matrix(W: torch.Tensor) -> torch.Tensor:
    w = torch.as_tensor(W).detach().to(device="cpu", dtype=torch.float64)
    if w.ndim != 2 or w.shape[0] != w.shape[1] or w.shape[0] == 0:
        raise TopologyError(f"W must be a non-empty square matrix, got shape {tuple(w.shape)}")
    return w


def validate_mixing_matrix(
    W: torch.Tensor, graph: nx.Graph | None = None, atol: float = 1e-10
) -> None:
    """Raise :class:`TopologyError` unless ``W`` satisfies invariant 13 (for ``graph``)."""
    w = _as_matrix(W)
    if not torch.isfinite(w).all():
        raise TopologyError("W has NaN or infinite entries")
    _check_symmetric(w, atol)
    _check_non_negative(w, atol)
    _check_sums(w, atol)
    if graph is not None:
        _check_sparsity(w, graph, atol)
    gap = _gap(w)  # symmetry already checked to ``atol``
    if gap <= atol:
        raise TopologyError(
            f"W has spectral gap {gap:.3e} <= 0: gossip never reaches consensus (graph "
            "disconnected, or periodic mixing). Change topology.name or topology.mixing"
        )


def _check_symmetric(w: torch.Tensor, atol: float) -> None:
    diff = (w - w.T).abs()
    if diff.max() > atol:
        i, j = divmod(int(diff.argmax()), w.shape[0])
        raise TopologyError(
            f"W is not symmetric: W[{i},{j}]={w[i, j].item():.6g} != "
            f"W[{j},{i}]={w[j, i].item():.6g}"
        )


def _check_non_negative(w: torch.Tensor, atol: float) -> None:
    if w.min() < -atol:
        i, j = divmod(int(w.argmin()), w.shape[0])
        raise TopologyError(f"W has a negative entry: W[{i},{j}]={w[i, j].item():.6g}")


def _check_sums(w: torch.Tensor, atol: float) -> None:
    for axis, label in ((1, "row"), (0, "column")):
        err = (w.sum(dim=axis) - 1.0).abs()
        if err.max() > atol:
            k = int(err.argmax())
            total = w.sum(dim=axis)[k].item()
            raise TopologyError(f"W {label} {k} sums to {total:.12g}, not 1")


def _check_sparsity(w: torch.Tensor, graph: nx.Graph, atol: float) -> None:
    n = _check_graph_nodes(graph)
    if w.shape[0] != n:
        raise TopologyError(f"W is {w.shape[0]}x{w.shape[0]} but the graph has {n} nodes")
    expected = torch.eye(n, dtype=torch.bool)
    for i, j in graph.edges:
        expected[i, j] = expected[j, i] = True
    actual = w > atol
    wrong = (actual != expected).nonzero()
    if len(wrong):
        i, j = (int(x) for x in wrong[0])
        what = "diagonal" if i == j else ("an edge" if expected[i, j] else "not an edge")
        raise TopologyError(
            f"W sparsity does not match graph + diagonal: W[{i},{j}]={w[i, j].item():.6g} "
            f"but ({i},{j}) is {what}"
        )


# --------------------------------------------------------------------------- logging


def describe(graph: nx.Graph, W: torch.Tensor) -> dict:
    """JSON-friendly summary of the topology for logs and run metadata."""
    n = graph.number_of_nodes()
    return {
        "name": graph.graph.get("name", "custom"),
        "num_clients": n,
        "num_edges": graph.number_of_edges(),
        "degrees": [int(graph.degree(i)) for i in range(n)],
        "spectral_gap": spectral_gap(W),
    }
