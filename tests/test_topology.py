"""Tests for deca_flower.topology: graphs, mixing matrices and invariant 13.

The invariant checks recompute everything independently of the module (numpy
eigenvalues, explicit sums, the Metropolis formula from networkx degrees), so a
bug in the module cannot hide behind its own validator.
"""

from __future__ import annotations

import math

import networkx as nx
import numpy as np
import pytest
import torch

from deca_flower.topology import (
    TOPOLOGIES,
    TopologyError,
    build_graph,
    describe,
    mixing_matrix,
    neighbours,
    spectral_gap,
    torus_shape,
    validate_mixing_matrix,
)

# (name, n, expected edge count, expected sorted degree sequence)
EXPECTED = [
    ("ring", 2, 1, [1, 1]),
    ("ring", 3, 3, [2] * 3),
    ("ring", 8, 8, [2] * 8),
    ("complete", 1, 0, [0]),
    ("complete", 5, 10, [4] * 5),
    ("complete", 8, 28, [7] * 8),
    ("bipartite", 2, 1, [1, 1]),
    ("bipartite", 7, 12, [3] * 4 + [4] * 3),  # K_{4,3}
    ("bipartite", 8, 16, [4] * 8),  # K_{4,4}
    ("torus", 9, 18, [4] * 9),  # 3 x 3
    ("torus", 12, 24, [4] * 12),  # 3 x 4
    ("torus", 16, 32, [4] * 16),  # 4 x 4
    ("star", 1, 0, [0]),
    ("star", 6, 5, [1] * 5 + [5]),
]

# Every builder on a couple of sizes, for the invariant-13 sweep.
ALL_GRAPHS = [(name, n) for name, n, _, _ in EXPECTED] + [
    ("er", 1),
    ("er", 8),
    ("er", 16),
    ("random_bipartite", 8),
    ("random_bipartite", 11),
]


def _edges(graph: nx.Graph) -> set[frozenset[int]]:
    return {frozenset(e) for e in graph.edges}


def _independent_gap(w: np.ndarray) -> float:
    """1 - second largest |eigenvalue|, via the general (non-symmetric) numpy solver."""
    if w.shape[0] == 1:
        return 1.0
    moduli = np.sort(np.abs(np.linalg.eigvals(w)))[::-1]
    return float(1.0 - moduli[1])


def _assert_invariant_13(w: np.ndarray, graph: nx.Graph) -> None:
    n = graph.number_of_nodes()
    assert w.shape == (n, n)
    np.testing.assert_allclose(w, w.T, atol=1e-14, rtol=0)
    assert (w >= 0).all()
    np.testing.assert_allclose(w.sum(axis=1), np.ones(n), atol=1e-12, rtol=0)
    np.testing.assert_allclose(w.sum(axis=0), np.ones(n), atol=1e-12, rtol=0)
    support = {frozenset((i, j)) for i in range(n) for j in range(n) if i != j and w[i, j] > 0}
    assert support == _edges(graph)
    assert (np.diag(w) > 0).all()
    assert _independent_gap(w) > 1e-9


# --------------------------------------------------------------------------- graphs


@pytest.mark.parametrize(("name", "n", "num_edges", "degrees"), EXPECTED)
def test_deterministic_topologies_shape(name: str, n: int, num_edges: int, degrees: list) -> None:
    graph = build_graph(name, n)
    assert list(graph.nodes) == list(range(n))
    assert graph.number_of_edges() == num_edges
    assert sorted(d for _, d in graph.degree) == degrees
    assert nx.is_connected(graph)
    assert graph.graph["name"] == name


def test_topologies_tuple_is_complete() -> None:
    assert TOPOLOGIES == (
        "ring",
        "er",
        "complete",
        "bipartite",
        "random_bipartite",
        "torus",
        "star",
        "file",
    )


def test_ring_edges_are_consecutive() -> None:
    assert _edges(build_graph("ring", 5)) == {frozenset((i, (i + 1) % 5)) for i in range(5)}


def test_star_hub_is_node_zero() -> None:
    graph = build_graph("star", 6)
    assert neighbours(graph, 0) == [1, 2, 3, 4, 5]
    assert all(neighbours(graph, i) == [0] for i in range(1, 6))


def test_bipartite_sides() -> None:
    graph = build_graph("bipartite", 7)
    left, right = set(range(4)), set(range(4, 7))
    assert _edges(graph) == {frozenset((a, b)) for a in left for b in right}


def test_torus_is_most_square_and_periodic() -> None:
    assert torus_shape(9) == (3, 3)
    assert torus_shape(12) == (3, 4)
    assert torus_shape(36) == (6, 6)
    assert torus_shape(24) == (4, 6)
    assert torus_shape(8) is None
    assert torus_shape(14) is None  # 2 x 7: a side of 2 is not allowed
    assert torus_shape(13) is None  # prime
    graph = build_graph("torus", 12)  # 3 rows x 4 cols, row-major ranks
    assert neighbours(graph, 0) == sorted([1, 3, 4, 8])
    assert neighbours(graph, 5) == sorted([4, 6, 1, 9])


def test_er_is_deterministic_from_seed_and_connected() -> None:
    a = build_graph("er", 12, p=0.3, seed=7)
    b = build_graph("er", 12, p=0.3, seed=7)
    assert _edges(a) == _edges(b)
    seeds = [build_graph("er", 12, p=0.3, seed=s) for s in range(10)]
    assert all(nx.is_connected(g) for g in seeds)
    assert all(sorted(g.nodes) == list(range(12)) for g in seeds)
    assert len({frozenset(_edges(g)) for g in seeds}) > 1  # seed actually matters


def test_er_low_p_is_resampled_until_connected() -> None:
    # p = 0.25 at n = 10 is below ln(n)/n ~ 0.23 + margin: many samples are disconnected.
    graphs = [build_graph("er", 10, p=0.25, seed=seed) for seed in range(5)]
    assert all(nx.is_connected(g) for g in graphs)
    assert max(g.graph["attempts"] for g in graphs) > 1  # resampling really happened


def test_er_p_one_is_complete() -> None:
    assert build_graph("er", 6, p=1.0).number_of_edges() == 15


def test_er_impossible_names_p() -> None:
    with pytest.raises(TopologyError, match=r"topology\.p"):
        build_graph("er", 30, p=0.01, seed=0, max_tries=20)


@pytest.mark.parametrize("p", [0.0, -0.1, 1.5, "abc"])
def test_bad_p_names_p(p: object) -> None:
    with pytest.raises(TopologyError, match=r"topology\.p"):
        build_graph("er", 8, p=p)


def test_random_bipartite_is_bipartite_connected_deterministic() -> None:
    graph = build_graph("random_bipartite", 9, p=0.5, seed=3)
    left = set(range(5))
    assert nx.is_connected(graph)
    assert all((u in left) != (v in left) for u, v in graph.edges)
    assert _edges(graph) == _edges(build_graph("random_bipartite", 9, p=0.5, seed=3))
    with pytest.raises(TopologyError, match=r"topology\.p"):
        build_graph("random_bipartite", 20, p=0.02, max_tries=10)


def test_unknown_name() -> None:
    with pytest.raises(TopologyError, match=r"topology\.name") as err:
        build_graph("hypercube", 8)
    assert "ring" in str(err.value) and "file" in str(err.value)


@pytest.mark.parametrize("n", [4, 8, 10, 13, 14])
def test_bad_torus_n(n: int) -> None:
    with pytest.raises(TopologyError, match="num_clients") as err:
        build_graph("torus", n)
    assert "rows, cols >= 3" in str(err.value)
    assert "nearest" in str(err.value)


@pytest.mark.parametrize("n", [0, -3])
def test_bad_num_clients(n: int) -> None:
    with pytest.raises(TopologyError, match="num_clients"):
        build_graph("complete", n)


@pytest.mark.parametrize("name", ["ring", "bipartite", "random_bipartite"])
def test_two_node_minimum(name: str) -> None:
    with pytest.raises(TopologyError, match="num_clients >= 2"):
        build_graph(name, 1)


def test_neighbours_sorted_and_unknown_node() -> None:
    graph = build_graph("complete", 4)
    assert neighbours(graph, 2) == [0, 1, 3]
    with pytest.raises(TopologyError):
        neighbours(graph, 4)


# --------------------------------------------------------------------------- file topologies


def test_file_topology(tmp_path) -> None:
    path = tmp_path / "g.txt"
    path.write_text("# a path with a chord\n0 1\n1 2  # inline comment\n2 3\n3 0 1.5\n\n0 2\n")
    graph = build_graph("file", 4, path=str(path))
    assert _edges(graph) == {frozenset(e) for e in [(0, 1), (1, 2), (2, 3), (3, 0), (0, 2)]}
    assert graph.graph["name"] == "file"
    validate_mixing_matrix(mixing_matrix(graph), graph)


def test_file_disconnected(tmp_path) -> None:
    path = tmp_path / "g.txt"
    path.write_text("0 1\n2 3\n")
    with pytest.raises(TopologyError, match=r"disconnected.*topology\.path"):
        build_graph("file", 4, path=str(path))


def test_file_self_loop(tmp_path) -> None:
    path = tmp_path / "g.txt"
    path.write_text("0 1\n1 1\n1 2\n")
    with pytest.raises(TopologyError, match=r"self-loops on nodes \[1\]"):
        build_graph("file", 3, path=str(path))


def test_file_wrong_nodes(tmp_path) -> None:
    path = tmp_path / "g.txt"
    path.write_text("0 1\n1 2\n2 5\n")
    with pytest.raises(TopologyError, match=r"topology\.path") as err:
        build_graph("file", 4, path=str(path))
    assert "missing [3]" in str(err.value) and "unexpected [5]" in str(err.value)


def test_file_unparsable_missing_and_unset(tmp_path) -> None:
    path = tmp_path / "g.txt"
    path.write_text("a b\n")
    with pytest.raises(TopologyError, match=r"topology\.path.*cannot parse"):
        build_graph("file", 2, path=str(path))
    with pytest.raises(TopologyError, match=r"topology\.path"):
        build_graph("file", 2, path=str(tmp_path / "nope.txt"))
    with pytest.raises(TopologyError, match=r"topology\.path"):
        build_graph("file", 2)


# --------------------------------------------------------------------------- mixing matrices


@pytest.mark.parametrize("rule", ["metropolis", "uniform"])
@pytest.mark.parametrize(("name", "n"), ALL_GRAPHS)
def test_every_mixing_matrix_satisfies_invariant_13(name: str, n: int, rule: str) -> None:
    graph = build_graph(name, n, p=0.4, seed=1)
    w = mixing_matrix(graph, rule)
    assert w.dtype == torch.float64 and w.shape == (n, n)
    validate_mixing_matrix(w, graph)
    _assert_invariant_13(w.numpy(), graph)
    assert spectral_gap(w) == pytest.approx(_independent_gap(w.numpy()), abs=1e-10)


@pytest.mark.parametrize(("name", "n"), [("er", 8), ("star", 6), ("bipartite", 7), ("torus", 12)])
def test_metropolis_formula(name: str, n: int) -> None:
    graph = build_graph(name, n, p=0.4, seed=2)
    w = mixing_matrix(graph).numpy()
    deg = dict(graph.degree)
    expected = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if i != j and graph.has_edge(i, j):
                expected[i, j] = 1.0 / (1 + max(deg[i], deg[j]))
        expected[i, i] = 1.0 - expected[i].sum()
    np.testing.assert_allclose(w, expected, atol=1e-15, rtol=0)


def test_uniform_formula() -> None:
    graph = build_graph("star", 5)  # d_max = 4
    w = mixing_matrix(graph, "uniform").numpy()
    assert w[0, 1] == pytest.approx(0.2)
    assert w[0, 0] == pytest.approx(1 - 4 * 0.2)
    assert w[1, 1] == pytest.approx(0.8)
    assert w[1, 2] == 0.0


@pytest.mark.parametrize("n", [2, 3, 8])
@pytest.mark.parametrize("rule", ["metropolis", "uniform"])
def test_complete_graph_is_exact_average_with_gap_one(n: int, rule: str) -> None:
    w = mixing_matrix(build_graph("complete", n), rule)
    torch.testing.assert_close(w, torch.full((n, n), 1.0 / n, dtype=torch.float64))
    # W = 11^T/n has eigenvalues {1, 0, ..., 0}: closed-form gap is exactly 1.
    assert spectral_gap(w) == pytest.approx(1.0, abs=1e-12)
    assert _independent_gap(w.numpy()) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("n", [5, 8, 16])
def test_ring_gap_closed_form(n: int) -> None:
    # Metropolis on a ring is the circulant (1/3, 1/3, 1/3): eigenvalues 1/3 + 2/3 cos(2 pi k/n).
    eig = [1 / 3 + 2 / 3 * math.cos(2 * math.pi * k / n) for k in range(1, n)]
    expected = 1 - max(abs(e) for e in eig)
    assert spectral_gap(mixing_matrix(build_graph("ring", n))) == pytest.approx(expected, abs=1e-12)


def test_single_client() -> None:
    graph = build_graph("complete", 1)
    w = mixing_matrix(graph)
    assert w.tolist() == [[1.0]]
    validate_mixing_matrix(w, graph)
    assert spectral_gap(w) == 1.0


def test_unknown_mixing_rule() -> None:
    with pytest.raises(TopologyError, match=r"topology\.mixing") as err:
        mixing_matrix(build_graph("ring", 4), "max_degree")
    assert "metropolis" in str(err.value) and "uniform" in str(err.value)


def test_mixing_rejects_bad_graph() -> None:
    with pytest.raises(TopologyError, match="0..2"):
        mixing_matrix(nx.Graph([(0, 1), (1, 5)]))
    with pytest.raises(TopologyError, match="self-loops"):
        mixing_matrix(nx.Graph([(0, 1), (1, 1)]))


def test_describe() -> None:
    graph = build_graph("star", 4)
    info = describe(graph, mixing_matrix(graph))
    assert info["name"] == "star"
    assert info["num_clients"] == 4
    assert info["num_edges"] == 3
    assert info["degrees"] == [3, 1, 1, 1]
    assert isinstance(info["spectral_gap"], float) and 0 < info["spectral_gap"] <= 1


# --------------------------------------------------------------------------- validator rejects


def _ring_w(n: int = 4) -> tuple[torch.Tensor, nx.Graph]:
    graph = build_graph("ring", n)
    return mixing_matrix(graph), graph


def test_reject_asymmetric() -> None:
    # Doubly stochastic (a permutation-like tilt) but not symmetric.
    w = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.5, 0.3], [0.3, 0.2, 0.5]], dtype=torch.float64)
    with pytest.raises(TopologyError, match="not symmetric"):
        validate_mixing_matrix(w)
    with pytest.raises(TopologyError, match="symmetric"):
        spectral_gap(w)


def test_reject_negative() -> None:
    w = torch.tensor([[1.2, -0.2], [-0.2, 1.2]], dtype=torch.float64)
    with pytest.raises(TopologyError, match=r"negative entry: W\[0,1\]"):
        validate_mixing_matrix(w)


def test_reject_row_sum() -> None:
    w, graph = _ring_w()
    w = w.clone()
    w[2, 2] += 0.1  # symmetric, non-negative, but row/col 2 sums to 1.1
    with pytest.raises(TopologyError, match=r"row 2 sums to 1\.1"):
        validate_mixing_matrix(w, graph)


def test_reject_sparsity_mismatch() -> None:
    w, graph = _ring_w()
    # Move weight onto the non-edge (0, 2) keeping symmetry and stochasticity.
    w = w.clone()
    w[0, 2] = w[2, 0] = 0.1
    w[0, 0] -= 0.1
    w[2, 2] -= 0.1
    with pytest.raises(TopologyError, match=r"sparsity.*W\[0,2\].*not an edge"):
        validate_mixing_matrix(w, graph)
    # A missing edge weight is rejected too.
    w2, _ = _ring_w()
    w2 = w2.clone()
    w2[0, 1] = w2[1, 0] = 0.0
    w2[0, 0] += 1 / 3
    w2[1, 1] += 1 / 3
    with pytest.raises(TopologyError, match=r"W\[0,1\]=0 but \(0,1\) is an edge"):
        validate_mixing_matrix(w2, graph)


def test_reject_wrong_size_and_shape() -> None:
    w, _ = _ring_w(4)
    with pytest.raises(TopologyError, match="graph has 5 nodes"):
        validate_mixing_matrix(w, build_graph("ring", 5))
    with pytest.raises(TopologyError, match="square"):
        validate_mixing_matrix(torch.ones(2, 3, dtype=torch.float64) / 3)
    with pytest.raises(TopologyError, match="NaN"):
        validate_mixing_matrix(torch.full((2, 2), float("nan")))


def test_reject_disconnected_identity_and_periodic() -> None:
    # Identity: doubly stochastic, symmetric, but two clients never talk.
    with pytest.raises(TopologyError, match="spectral gap"):
        validate_mixing_matrix(torch.eye(2, dtype=torch.float64))
    # Swap matrix on K2: lambda_n = -1, consensus oscillates forever.
    swap = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    with pytest.raises(TopologyError, match="spectral gap"):
        validate_mixing_matrix(swap)


def test_disconnected_graph_mixing_fails_validation() -> None:
    graph = nx.Graph([(0, 1), (2, 3)])
    w = mixing_matrix(graph)  # still doubly stochastic ...
    with pytest.raises(TopologyError, match="spectral gap"):  # ... but no consensus
        validate_mixing_matrix(w, graph)
