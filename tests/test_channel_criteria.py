"""Q/K channel criteria against hand computations on tiny weights and statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from staterank.calibrate import LayerStats
from staterank.errors import StaterankError
from staterank.prune.channels import CHANNEL_CRITERIA, CriterionError, get_criterion
from staterank.prune.channels.base import STATISTICS
from staterank.rrqr import strong_rrqr

HEADS, D_K, HIDDEN, TOKENS = 2, 6, 5, 50
KEEP = 3


def per_head_gram(x: torch.Tensor) -> torch.Tensor:
    """x [T, H, d] -> [H, d, d], sum over tokens of x x^T."""
    return torch.stack([x[:, h].T @ x[:, h] for h in range(x.shape[1])])


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


@pytest.fixture
def problem():
    """Weights [Hk, d_k, hidden], features q, k [T, Hk, d_k] (channels of different scales) and their LayerStats."""
    g = torch.Generator().manual_seed(11)
    weights = tuple(torch.randn(HEADS, D_K, HIDDEN, generator=g, dtype=torch.float64) for _ in range(2))
    scale = torch.linspace(0.3, 2.0, D_K, dtype=torch.float64)
    q = torch.randn(TOKENS, HEADS, D_K, generator=g, dtype=torch.float64) * scale
    k = torch.randn(TOKENS, HEADS, D_K, generator=g, dtype=torch.float64) * scale.flip(0) + 0.5 * q
    stats = LayerStats(
        layer=3,
        tokens=TOKENS,
        gram_q=per_head_gram(q),
        gram_k=per_head_gram(k),
        gram_q_normed=per_head_gram(unit(q)),
        gram_k_normed=per_head_gram(unit(k)),
        input_sq=torch.rand(HIDDEN, generator=g, dtype=torch.float64) * 5 + 0.1,
        taylor_q=torch.rand(HEADS, D_K, generator=g, dtype=torch.float64),
        taylor_k=torch.rand(HEADS, D_K, generator=g, dtype=torch.float64),
    )
    return weights, stats, q, k


def select(name: str, stats, weights, keep: int = KEEP, seed: int = 0, **options):
    return get_criterion(name, **options).select(stats, weights, keep, torch.Generator().manual_seed(seed))


def top_sorted(scores: list[list[float]], keep: int) -> list[list[int]]:
    return [sorted(sorted(range(len(row)), key=lambda c: -row[c])[:keep]) for row in scores]


def hand_scores(name: str, weights, stats) -> list[list[float]]:
    w_q, w_k = (w.tolist() for w in weights)
    input_sq = stats.input_sq.tolist()
    scores = []
    for h in range(HEADS):
        row = []
        for c in range(D_K):
            if name == "l1":
                row.append(sum(abs(w_q[h][c][j]) + abs(w_k[h][c][j]) for j in range(HIDDEN)))
            elif name == "l2":
                row.append(sum(w_q[h][c][j] ** 2 + w_k[h][c][j] ** 2 for j in range(HIDDEN)) ** 0.5)
            elif name == "wanda":
                row.append(sum((abs(w_q[h][c][j]) + abs(w_k[h][c][j])) * input_sq[j] ** 0.5 for j in range(HIDDEN)))
            else:
                row.append(stats.taylor_q[h, c].item() + stats.taylor_k[h, c].item())
        scores.append(row)
    return scores


@pytest.mark.parametrize("name", ["l1", "l2", "wanda", "taylor"])
def test_scores_match_hand_computation(problem, name):
    weights, stats, _, _ = problem
    expected = hand_scores(name, weights, stats)
    for keep in (1, KEEP, D_K):
        selection = select(name, stats, weights, keep)
        np.testing.assert_allclose(selection.scores.numpy(), np.array(expected), rtol=1e-12)
        assert selection.index.tolist() == top_sorted(expected, keep)
        assert selection.basis is None


@pytest.mark.parametrize("name", sorted(CHANNEL_CRITERIA))
def test_selection_shape(problem, name):
    weights, stats, _, _ = problem
    index = select(name, stats, weights).index
    assert index.shape == (HEADS, KEEP) and index.dtype == torch.long
    assert (index.diff(dim=-1) > 0).all() and index.min() >= 0 and index.max() < D_K


def test_random_is_seeded():
    weights = (torch.zeros(4, 32, 3), torch.zeros(4, 32, 3))
    first, again, other = (select("random", None, weights, 8, seed).index for seed in (0, 0, 1))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert all(len(set(row.tolist())) == 8 for row in first)


@pytest.mark.parametrize("include_queries", [False, True])
def test_pca_spans_top_eigenvectors(problem, include_queries):
    weights, stats, _, _ = problem
    assert select("pca", stats, weights, include_queries=include_queries).basis is None  # channels by default
    selection = select("pca", stats, weights, include_queries=include_queries, rotate=True)
    assert selection.basis.shape == (HEADS, KEEP, D_K)
    for h in range(HEADS):
        gram = stats.gram_k_normed[h].numpy() + (stats.gram_q_normed[h].numpy() if include_queries else 0)
        eigenvalues, eigenvectors = np.linalg.eigh(gram)
        top = eigenvectors[:, ::-1][:, :KEEP]
        basis = selection.basis[h].numpy()
        np.testing.assert_allclose(basis @ basis.T, np.eye(KEEP), atol=1e-12)
        np.testing.assert_allclose(basis.T @ basis, top @ top.T, atol=1e-10)  # the same subspace
        np.testing.assert_allclose(np.diag(basis @ gram @ basis.T), eigenvalues[::-1][:KEEP], rtol=1e-10)
    energy = [[sum(selection.basis[h, r, c].item() ** 2 for r in range(KEEP)) for c in range(D_K)] for h in range(2)]
    np.testing.assert_allclose(selection.scores.numpy(), np.array(energy), rtol=1e-12)
    assert selection.index.tolist() == top_sorted(energy, KEEP)


@pytest.mark.parametrize(
    "options", [{}, {"use_queries": False}, {"normalize": True}, {"f": 1.01, "use_queries": False, "normalize": True}]
)
def test_rrqr_matches_rrqr_of_the_stacked_features(problem, options):
    weights, stats, q, k = problem
    if options.get("normalize"):
        q, k = unit(q), unit(k)
    stacked = torch.cat([q, k]) if options.get("use_queries", True) else k  # [2T or T, Hk, d_k]
    index = select("rrqr", stats, weights, **options).index
    for h in range(HEADS):
        perm, _ = strong_rrqr(stacked[:, h], KEEP, options.get("f", 1.5))
        assert index[h].tolist() == sorted(perm[:KEEP].tolist())


def test_rrqr_skips_dead_and_duplicate_channels():
    g = torch.Generator().manual_seed(12)
    k = torch.randn(TOKENS, 1, D_K, generator=g, dtype=torch.float64)
    k[..., 0] = 0.0  # dead channel
    k[..., 4] = 2 * k[..., 2]  # exactly dependent channel
    stats = LayerStats(layer=0, gram_q=torch.zeros(1, D_K, D_K), gram_k=per_head_gram(k))
    stats.gram_q_normed = stats.gram_k_normed = stats.gram_k
    weights = (torch.zeros(1, D_K, HIDDEN), torch.zeros(1, D_K, HIDDEN))
    for keep in (2, 3, 4):
        kept = set(select("rrqr", stats, weights, keep).index[0].tolist())
        assert 0 not in kept and not {2, 4} <= kept


def test_rrqr_warns_when_swaps_run_out():
    # Kahan's matrix (see test_rrqr), rows as tokens: QRCP keeps the identity order and needs a swap at keep = 11
    n, c = 12, 0.5
    features = torch.diag((1 - c * c) ** (torch.arange(n) / 2)) @ (torch.eye(n) - c * torch.ones(n, n).triu(1))
    features = features.double() * 0.999 ** torch.arange(n)
    gram = (features.T @ features)[None]
    stats = LayerStats(layer=7, gram_q=gram, gram_k=gram, gram_q_normed=gram, gram_k_normed=gram)
    weights = (torch.zeros(1, 12, HIDDEN), torch.zeros(1, 12, HIDDEN))
    with pytest.warns(UserWarning, match="layer 7, head 0: .* not certified strong"):
        stuck = select("rrqr", stats, weights, 11, max_swaps=0).index
    assert stuck.tolist() == [list(range(11))]
    assert 11 in select("rrqr", stats, weights, 11).index[0].tolist()


@pytest.mark.parametrize("name,need", [("wanda", "inputs"), ("taylor", "gradients"), ("pca", "features")])
def test_missing_statistics(problem, name, need):
    weights, stats, _, _ = problem
    for field in STATISTICS[need][0]:
        setattr(stats, field, None)
    with pytest.raises(CriterionError, match=need):
        select(name, stats, weights)
    with pytest.raises(CriterionError, match=need):
        select(name, None, weights)
    assert select("l1", None, weights).index.shape == (HEADS, KEEP)


@pytest.mark.parametrize("keep", [0, D_K + 1])
def test_impossible_keep(problem, keep):
    weights, stats, _, _ = problem
    with pytest.raises(CriterionError, match="cannot keep"):
        select("l1", stats, weights, keep)


def test_registry_and_lookup():
    assert set(CHANNEL_CRITERIA) == {"random", "l1", "l2", "lottery", "wanda", "taylor", "pca", "rrqr"}
    for name, cls in CHANNEL_CRITERIA.items():
        assert cls.name == name and cls.needs <= set(STATISTICS)
    with pytest.raises(CriterionError, match="l1, l2, lottery, pca, random, rrqr, taylor, wanda") as error:
        get_criterion("magnitude")
    assert isinstance(error.value, StaterankError)
    with pytest.raises(CriterionError, match="no option frobnicate; its options: f, use_queries, normalize, max_swaps"):
        get_criterion("rrqr", frobnicate=1)
    with pytest.raises(CriterionError, match="f must exceed 1"):
        get_criterion("rrqr", f=1.0)
    assert get_criterion("rrqr", f=2.0, normalize=True).f == 2.0
    assert get_criterion("pca", include_queries=True).include_queries


def test_the_registry_helper():
    """One helper behind both registries: duplicates, unknown names and options, option types, one-line help."""
    from dataclasses import dataclass

    from staterank.prune.heads import HEAD_CRITERIA, HeadCriterionError, get_head_criterion
    from staterank.registry import Registry

    registry = Registry("toy", CriterionError)

    @registry.register
    @dataclass
    class Toy:
        """Keeps everything.

        More detail that the help leaves out."""

        name = "toy"
        size: int = 2
        scale: float = 1.0
        flag: bool = False

    assert list(registry) == registry.names() == ["toy"] and "toy" in registry and registry["toy"] is Toy
    assert registry.help("toy") == "Keeps everything." and registry.describe() == "toy: Keeps everything"
    assert registry.get("toy", size=3, scale=2).scale == 2  # an int is a float
    with pytest.raises(ValueError, match="'toy' is registered twice"):
        registry.register(dataclass(type("Other", (), {"name": "toy", "__doc__": "Another."})))
    with pytest.raises(CriterionError, match="option size takes a whole number, got 'x'"):
        registry.get("toy", size="x")
    with pytest.raises(CriterionError, match="option flag takes true or false, got 1"):
        registry.get("toy", flag=1)
    with pytest.raises(CriterionError, match="option scale takes a number, got True"):
        registry.get("toy", scale=True)

    # the two registries of criteria: every entry has a help line; lookups refuse with the registry's error
    for criteria in (CHANNEL_CRITERIA, HEAD_CRITERIA):
        assert all(criteria.help(name) and "%" not in criteria.help(name) for name in criteria)
    assert list(HEAD_CRITERIA) == ["jrnp", "heads-rank", "heads-norm", "heads-low-rank", "heads-random"]
    with pytest.raises(HeadCriterionError, match="'jrnp' has no option beta; its options: alpha"):
        get_head_criterion("jrnp", beta=1)
    with pytest.raises(HeadCriterionError, match="heads-low-rank, heads-norm, heads-random, heads-rank, jrnp"):
        get_head_criterion("saturation")
    with pytest.raises(CriterionError, match="max_swaps must be at least 0"):
        get_criterion("rrqr", max_swaps=-1)
    with pytest.raises(CriterionError, match="option rotate takes true or false"):
        get_criterion("pca", rotate="yes")


@pytest.mark.parametrize(
    ("method", "options", "message"),
    [
        ("magnitude", {}, "unknown method 'magnitude'; q/k channel methods: l1, l2, lottery, pca"),
        ("rrqr", {"f": 1.0}, "f must exceed 1"),
        ("rrqr", {"g": 2}, "no option g"),
        ("rrqr", {}, "is data-driven: pass --data"),
        ("jrnp", {"alpha": 2.0, "data": "techdocs"}, "alpha must be a number in [0, 1]"),
        ("heads-random", {"unit": "query"}, "unit must be one of"),
        ("heads-random", {"scope": "global", "unit": "key"}, "--unit applies to --scope layer"),
        ("jrnp", {}, "pass --data"),
    ],
)
def test_prune_refuses_methods_and_options_before_loading(method, options, message, tmp_path):
    """The model does not exist: each refusal comes from the option itself, before any loading."""
    from staterank import api

    extra = {name: options.pop(name) for name in ("data", "scope", "unit", "alpha") if name in options}
    with pytest.raises(StaterankError) as refused:
        api.prune(tmp_path / "no-model", method, 0.5, tmp_path / "out", options=options, **extra)
    assert message in str(refused.value)
    assert not (tmp_path / "out").exists()


def test_the_command_line_help_lists_every_registered_method(capsys):
    from staterank.cli import main
    from staterank.prune.heads import HEAD_CRITERIA

    def squeezed(text: str) -> str:  # argparse rewraps help text, breaking lines at spaces and hyphens
        return "".join(text.split())

    assert main(["prune", "--help"]) == 0
    prune_help = squeezed(capsys.readouterr().out)
    assert main(["--help"]) == 0
    top_help = squeezed(capsys.readouterr().out)
    for criteria in (CHANNEL_CRITERIA, HEAD_CRITERIA):
        for name in criteria:
            assert squeezed(f"{name}: {criteria.help(name).rstrip('.')}") in prune_help
        assert squeezed(", ".join(criteria)) in top_help
