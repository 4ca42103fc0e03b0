"""Statistical tests of lossless speculative sampling (:mod:`specdec.algorithms.rejection`), with proof of their power.

Method. Each case fixes, by hand, a small vocabulary (V = 5..8), a target and a drafter. Both are "Markov" tables:
the logits (target) or probabilities (draft q) at a tree node depend only on the node's depth d and its token t:
the root reads ``table.root [V]``, a depth-d node with token t reads ``table.rows[d - 1][t] [V]`` (the last row
table is reused deeper). So the target's true distribution of the first K generated tokens is known exactly:
``P(a, b, c) = p0(a) * p1(b | a) * p2(c | b)`` with ``p_d = warp_probs(target logits at depth d)``.

Every trial draws a fresh draft tree from q with a seeded generator (the children of a node are drawn together
**without replacement**: ``torch.multinomial(q, k, replacement=False)``; a deterministic case fixes them), runs
the rule once and records the first K emitted tokens = the accepted draft tokens + the next token. When a step
emits fewer than K tokens the rest are drawn from the target directly — exactly what the following verify steps
would emit with root-only trees — so only the rule's own output is under test.

Test: Pearson's chi-square goodness of fit of the K-token joint against the exact joint, at significance
``ALPHA = 1e-3`` (reject when the statistic exceeds the (1 - ALPHA) quantile of chi-square with df = cells - 1),
after merging the cells whose expected count is < 5; a cell of target probability 0 must stay empty. The
chi-square survival function is implemented below (regularized incomplete gamma) because scipy is not a
dependency. All seeds are fixed, so the suite is deterministic: a correct rule passes at these seeds, and the
deliberately wrong rules at the end must FAIL the very same test (their statistic exceeds the critical value).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from drafters import tree_shape as S
from specdec.algorithms import acceptance as A
from specdec.algorithms import rejection as R
from specdec.algorithms import tree as T
from specdec.algorithms.sampling import SamplingParams, warp_probs
from specdec.errors import SpecdecError
from specdec.types import DraftTree

ALPHA = 1e-3  # significance of every goodness-of-fit test in this file and in test_sampling_e2e.py
MIN_EXPECTED = 5.0  # cells with a smaller expected count are merged (the usual validity rule of thumb)
SAMPLE = SamplingParams(do_sample=True)


# ---------------------------------------------------------------- chi-square, without scipy


def _log_gamma_prefactor(a: float, x: float) -> float:
    return -x + a * math.log(x) - math.lgamma(a)


def gammaincc(a: float, x: float) -> float:
    """Regularized upper incomplete gamma Q(a, x) (series for x < a + 1, Lentz continued fraction otherwise)."""
    if x <= 0:
        return 1.0
    if x < a + 1:
        term = total = 1.0 / a
        n = 0
        while abs(term) > abs(total) * 1e-16 and n < 10_000:
            n += 1
            term *= x / (a + n)
            total += term
        return max(0.0, 1.0 - total * math.exp(_log_gamma_prefactor(a, x)))
    tiny = 1e-300
    b = x + 1.0 - a
    c, d = 1.0 / tiny, 1.0 / b
    h = d
    for i in range(1, 10_000):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        h *= d * c
        if abs(d * c - 1.0) < 1e-16:
            break
    return math.exp(_log_gamma_prefactor(a, x)) * h


def chi2_sf(x: float, df: int) -> float:
    """P(X > x) for X ~ chi-square(df)."""
    return gammaincc(df / 2.0, x / 2.0)


def chi2_critical(df: int, alpha: float = ALPHA) -> float:
    """The (1 - alpha) quantile of chi-square(df), by bisection on :func:`chi2_sf`."""
    lo, hi = 0.0, df + 20.0 * math.sqrt(2.0 * df) + 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if chi2_sf(mid, df) > alpha else (lo, mid)
    return (lo + hi) / 2


def _merge(observed: list[list[float]], expected: list[float]) -> tuple[list[list[float]], list[float]]:
    """Pool cells, smallest expected first, until every pooled cell expects >= MIN_EXPECTED."""
    order = sorted(range(len(expected)), key=lambda i: expected[i])
    groups_o: list[list[float]] = []
    groups_e: list[float] = []
    pool_o = [0.0] * len(observed)
    pool_e = 0.0
    for i in order:
        pool_o = [po + o[i] for po, o in zip(pool_o, observed)]
        pool_e += expected[i]
        if pool_e >= MIN_EXPECTED:
            groups_o.append(pool_o)
            groups_e.append(pool_e)
            pool_o, pool_e = [0.0] * len(observed), 0.0
    if pool_e > 0 and groups_e:  # a small leftover joins the last (largest) group
        groups_o[-1] = [g + po for g, po in zip(groups_o[-1], pool_o)]
        groups_e[-1] += pool_e
    return groups_o, groups_e


def chi_square_gof(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic and degrees of freedom of ``counts`` (any shape) against ``probs`` (same shape).

    Cells of probability 0 are left out of the statistic; the caller checks they are empty (``assert_matches``).
    """
    c = counts.flatten().double()
    p = probs.flatten().double()
    p = p / p.sum()
    n = float(c.sum())
    keep = p > 0
    groups_o, groups_e = _merge([c[keep].tolist()], (n * p[keep]).tolist())
    stat = sum((o[0] - e) ** 2 / e for o, e in zip(groups_o, groups_e))
    return stat, len(groups_e) - 1


def chi_square_homogeneity(counts_a: torch.Tensor, counts_b: torch.Tensor) -> tuple[float, int]:
    """Two-sample chi-square test (2 x C contingency table): do two samples come from one distribution?"""
    a, b = counts_a.flatten().double(), counts_b.flatten().double()
    na, nb = float(a.sum()), float(b.sum())
    total = a + b
    keep = total > 0
    small = min(na, nb) / (na + nb)  # expected share of the smaller sample in every cell
    groups_o, groups_t = _merge([a[keep].tolist(), b[keep].tolist()], (small * total[keep]).tolist())
    stat = 0.0
    for (oa, ob), t in zip(groups_o, groups_t):
        col = t / small
        for o, n in ((oa, na), (ob, nb)):
            e = n * col / (na + nb)
            stat += (o - e) ** 2 / e
    return stat, len(groups_t) - 1


def assert_matches(counts: torch.Tensor, probs: torch.Tensor, what: str = "") -> float:
    """Assert the empirical counts fit ``probs`` at ALPHA; returns the statistic (for reports)."""
    zero = probs.flatten() <= 0
    assert int(counts.flatten()[zero].sum()) == 0, f"{what}: a token sequence of target probability 0 was emitted"
    stat, df = chi_square_gof(counts, probs)
    crit = chi2_critical(df)
    assert stat <= crit, f"{what}: chi-square {stat:.1f} > critical {crit:.1f} (df={df}, alpha={ALPHA})"
    return stat


def test_chi_square_helpers_golden():
    assert chi2_sf(3.841458820694124, 1) == pytest.approx(0.05, rel=1e-9)
    assert chi2_sf(7.0, 2) == pytest.approx(math.exp(-3.5), rel=1e-12)  # df = 2 is exponential
    assert chi2_sf(30.0, 10) == pytest.approx(8.5664e-4, rel=1e-4)  # tables: 1 - F(30; 10)
    assert chi2_critical(10) == pytest.approx(29.5883, abs=1e-3)  # tables: chi2(0.999, 10)
    assert chi2_critical(1, 0.05) == pytest.approx(3.841459, abs=1e-5)
    # perfect fit: statistic 0; merging keeps counts and expected totals
    stat, df = chi_square_gof(torch.tensor([50, 30, 20]), torch.tensor([0.5, 0.3, 0.2]))
    assert stat == pytest.approx(0, abs=1e-9) and df == 2
    # expected 960, 30, 7, 3: the cells expecting 3 and 7 are pooled (observed 8 + 12 against 10)
    stat, df = chi_square_gof(torch.tensor([960, 20, 12, 8]), torch.tensor([0.96, 0.03, 0.007, 0.003]))
    assert df == 2 and stat == pytest.approx((20 - 10) ** 2 / 10 + (20 - 30) ** 2 / 30)
    stat, df = chi_square_homogeneity(torch.tensor([10, 20, 30]), torch.tensor([20, 40, 60]))
    assert stat == pytest.approx(0) and df == 2


# ---------------------------------------------------------------- the harness


@dataclass(frozen=True)
class Table:
    """Per-node distribution by depth and token: ``root [V]``; ``rows[d - 1] [V, V]`` (row t: a depth-d node
    with token t; the last table is reused deeper)."""

    root: torch.Tensor  # [V]
    rows: tuple[torch.Tensor, ...]  # each [V, V]

    def at(self, depth: int, tokens: torch.Tensor) -> torch.Tensor:
        """``[n, V]`` rows for nodes of one depth with ``tokens [n]``."""
        if depth == 0:
            return self.root.expand(len(tokens), -1)
        return self.rows[min(depth, len(self.rows)) - 1][tokens]

    def warped(self, params: SamplingParams) -> Table:
        """Row-by-row ``warp_probs``: the same float32 computation the rule does at one node."""
        def rowwise(m):
            return torch.stack([warp_probs(r, params) for r in m])
        return Table(warp_probs(self.root, params), tuple(rowwise(m) for m in self.rows))


def logits_of(probs) -> torch.Tensor:
    """Logits (log-probabilities; -inf for zero) of a hand-written distribution."""
    p = torch.tensor(probs, dtype=torch.float64)
    return torch.log(p / p.sum(dim=-1, keepdim=True))


def random_rows(v: int, seed: int, scale: float = 1.0, depth: int = 1) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(v, v, generator=g, dtype=torch.float64) * scale for _ in range(depth))


def target_joint(target: Table, params: SamplingParams, k: int) -> torch.Tensor:
    """``[V] * k`` the target's exact joint of its first k tokens (a Markov chain over depths)."""
    p = target.warped(params)
    joint = p.root.double()
    for d in range(1, k):
        step = p.rows[min(d, len(p.rows)) - 1].double()  # [V, V]: row = previous token
        joint = joint.unsqueeze(-1) * step.view(*([1] * (d - 1)), *step.shape)
    return joint


@dataclass
class Result:
    counts: torch.Tensor  # [V] * K
    num_accepted: list[int]
    paths: list[list[int]]


def run_trials(parents: list[int], target: Table, params: SamplingParams, n: int, k: int, seed: int,
               draft: Table | None = None, fixed_tokens: list[int] | None = None,
               report_probs: bool = True) -> Result:
    """n independent verify steps on trees of shape ``parents``; counts of the first k emitted tokens.

    draft: q per node (children sampled from it without replacement; reported as draft_probs when
    ``report_probs``), or ``fixed_tokens``: the same deterministic candidates every trial (draft_probs None).
    """
    v = target.root.shape[-1]
    g_draft = torch.Generator().manual_seed(seed)
    g_rule = torch.Generator().manual_seed(seed + 1)
    parents_t = torch.tensor([parents])
    depth = T.depths(parents_t)[0].tolist()
    kids = R.children_lists(parents)
    num_nodes = len(parents)
    tokens = torch.zeros(n, num_nodes, dtype=torch.long)
    if fixed_tokens is not None:
        tokens[:] = torch.tensor(fixed_tokens)
    logits = torch.empty(n, num_nodes, v, dtype=torch.float64)
    probs = torch.zeros(n, num_nodes, v) if draft is not None and report_probs else None
    for u in range(num_nodes):  # parents precede children: a node's token is drawn before its row is read
        logits[:, u] = target.at(depth[u], tokens[:, u])
        if draft is not None:
            q = draft.at(depth[u], tokens[:, u])
            if probs is not None:
                probs[:, u] = q
            if kids[u]:
                assert int((q > 0).sum(dim=-1).min()) >= len(kids[u]), "q has fewer tokens than siblings"
                tokens[:, kids[u]] = torch.multinomial(q, len(kids[u]), replacement=False, generator=g_draft)
    p = target.warped(params)
    counts = torch.zeros([v] * k, dtype=torch.long)
    num_accepted, paths = [], []
    toks = tokens.tolist()
    for i in range(n):
        tree = DraftTree(tokens[i:i + 1], parents_t, None if probs is None else probs[i:i + 1])
        acc = R.speculative_sampling(tree, logits[i:i + 1], params, g_rule)
        path = acc.accepted_nodes(0)
        seq = [toks[i][u] for u in path[1:]] + [int(acc.next_token[0])]
        while len(seq) < k:  # the next verify steps, with root-only trees: plain sampling from the target
            row = p.rows[min(len(seq), len(p.rows)) - 1][seq[-1]]
            seq.append(int(torch.multinomial(row, 1, generator=g_rule)))
        counts[tuple(seq[:k])] += 1
        num_accepted.append(len(path) - 1)
        paths.append(path)
    return Result(counts, num_accepted, paths)


# ---------------------------------------------------------------- cases (hand-built p and q)

V6_P = [0.30, 0.25, 0.20, 0.12, 0.08, 0.05]
V6_Q = [0.05, 0.15, 0.35, 0.05, 0.25, 0.15]

CHAIN1 = [-1, 0]
CHAIN2 = [-1, 0, 1]
WIDE = [-1, 0, 0, 0, 0]  # root with 4 children, siblings drawn without replacement
DEEP = [-1, 0, 0, 0, 1, 1, 2, 4, 4, 5]  # widths 3 / 2,1 / 2,1: depth 3
WIDTH2_DEPTH2 = [-1, 0, 0, 1, 2]


def classic_case():
    """V = 5, a single draft token: the classic accept-min(1, p/q)-else-residual rule."""
    target = Table(logits_of([0.40, 0.25, 0.15, 0.12, 0.08]), random_rows(5, 11))
    draft = Table(torch.tensor([0.10, 0.20, 0.40, 0.05, 0.25]), (torch.softmax(random_rows(5, 12)[0], -1).float(),))
    return target, draft


def tree_case(v: int = 6, seed: int = 20, depth: int = 1):
    target = Table(logits_of(V6_P), random_rows(v, seed, depth=depth))
    draft_rows = tuple(torch.softmax(r, -1).float() for r in random_rows(v, seed + 1, depth=depth))
    return target, Table(torch.tensor(V6_Q), draft_rows)


# n-gram style fixed tree:  node 1: 4 (p = 0), node 2: 2, node 3: 1 under the root; 3 and 0 under node 2; 5 under 3
DET_PARENTS = [-1, 0, 0, 0, 2, 2, 3]
DET_TOKENS = [0, 4, 2, 1, 3, 0, 5]


def deterministic_case() -> Table:
    """V = 6, root p = (0.30, 0.25, 0.20, 0.25, 0, 0): tokens 4 and 5 impossible as the first token."""
    return Table(logits_of([0.30, 0.25, 0.20, 0.25, 0.0, 0.0]), random_rows(6, 50))


def test_classic_chain_single_draft_token():
    """Chain of one draft token with q given: first two tokens (draft/recovered, then bonus) ~ target."""
    target, draft = classic_case()
    res = run_trials(CHAIN1, target, SAMPLE, n=20_000, k=2, seed=1, draft=draft)
    assert_matches(res.counts, target_joint(target, SAMPLE, 2), "classic chain")
    # acceptance rate = sum min(p, q) = 0.10 + 0.20 + 0.15 + 0.05 + 0.08 = 0.58 (binomial sd ~0.0035)
    assert sum(res.num_accepted) / 20_000 == pytest.approx(0.58, abs=0.02)


def test_chain_depth_two_joint_of_two_tokens():
    target, draft = tree_case()
    res = run_trials(CHAIN2, target, SAMPLE, n=20_000, k=2, seed=2, draft=draft)
    assert_matches(res.counts, target_joint(target, SAMPLE, 2), "chain depth 2")
    assert max(res.num_accepted) == 2  # both depths exercised


def test_wide_tree_siblings_without_replacement():
    """Root with 4 children drawn without replacement from q: recursive rejection sampling over siblings."""
    target, draft = tree_case()
    res = run_trials(WIDE, target, SAMPLE, n=20_000, k=2, seed=3, draft=draft)
    assert_matches(res.counts, target_joint(target, SAMPLE, 2), "wide tree")
    accepted_child = {path[1] for path in res.paths if len(path) > 1}
    assert accepted_child == {1, 2, 3, 4}  # later siblings get accepted too


def test_deep_tree_joint_of_three_tokens():
    """Widths 3 / 2,1 / 2,1 (depth 3), V = 5: the joint of the first three tokens."""
    target = Table(logits_of([0.35, 0.25, 0.20, 0.12, 0.08]), random_rows(5, 30, depth=2))
    draft = Table(torch.tensor([0.10, 0.30, 0.30, 0.10, 0.20]),
                  tuple(torch.softmax(r, -1).float() for r in random_rows(5, 31, depth=2)))
    res = run_trials(DEEP, target, SAMPLE, n=16_000, k=3, seed=4, draft=draft)
    assert_matches(res.counts, target_joint(target, SAMPLE, 3), "deep tree")
    assert max(res.num_accepted) == 3


def test_identical_p_and_q_accepts_everything():
    """q == p (same warped rows): every draft token is accepted, always; the output is still p."""
    target = Table(logits_of(V6_P), random_rows(6, 40, depth=2))
    draft = target.warped(SAMPLE)
    chain = run_trials([-1, 0, 1, 2], target, SAMPLE, n=6_000, k=3, seed=5, draft=draft)
    assert chain.num_accepted == [3] * 6_000  # acceptance rate exactly 1
    assert_matches(chain.counts, target_joint(target, SAMPLE, 3), "identical p, q chain")
    tree = run_trials(WIDTH2_DEPTH2, target, SAMPLE, n=4_000, k=2, seed=6, draft=draft)
    assert all(path in ([0, 1, 3],) for path in tree.paths)  # the first sibling is always accepted
    assert_matches(tree.counts, target_joint(target, SAMPLE, 2), "identical p, q tree")


def test_disjoint_supports_rejects_everything():
    """p on {0, 1, 2}, q on {3, 4, 5}: no draft is ever accepted and the recovered token is exactly p."""
    p = [0.5, 0.3, 0.2, 0.0, 0.0, 0.0]
    q = torch.tensor([0.0, 0.0, 0.0, 0.2, 0.3, 0.5])
    target = Table(logits_of(p), (logits_of([p] * 6),))
    draft = Table(q, (q.expand(6, 6).clone(),))
    res = run_trials([-1, 0, 0, 0, 1], target, SAMPLE, n=6_000, k=1, seed=7, draft=draft)
    assert res.num_accepted == [0] * 6_000
    assert_matches(res.counts, torch.tensor(p), "disjoint supports")


def test_deterministic_candidates_point_masses():
    """draft_probs None (n-gram style fixed children), one candidate of target probability 0 (token 4 at the
    root): accepted with probability p(x), residual = p without x; the joint of two tokens is the target's."""
    target = deterministic_case()
    res = run_trials(DET_PARENTS, target, SAMPLE, n=20_000, k=2, seed=8, fixed_tokens=DET_TOKENS)
    assert_matches(res.counts, target_joint(target, SAMPLE, 2), "deterministic candidates")
    assert all(path[1:2] != [1] for path in res.paths)  # the impossible candidate is never accepted
    # P(accept node 2 (token 2)) = 0.20; P(accept node 3 (token 1)) = P(first rejected) * 0.25 / (1 - 0.20)
    first = [path[1] for path in res.paths if len(path) > 1]
    assert first.count(2) / 20_000 == pytest.approx(0.20, abs=0.015)
    assert first.count(3) / 20_000 == pytest.approx(0.25, abs=0.015)


def test_sampled_drafts_judged_as_point_masses_stay_lossless():
    """Drafts drawn from q but verified as deterministic candidates (draft_probs withheld) are still lossless:
    the point-mass rule is exact for *any* candidates chosen independently of the rule's own randomness; it
    only accepts less. (So "ignore q" is not a wrong rule; the wrong rules below are.)"""
    target, draft = tree_case()
    res = run_trials(WIDE, target, SAMPLE, n=8_000, k=2, seed=9, draft=draft, report_probs=False)
    assert_matches(res.counts, target_joint(target, SAMPLE, 2), "sampled drafts as point masses")


def test_top_k_top_p_temperature_warping():
    """Target and draft warped with temperature 0.8, top_k = 5, top_p = 0.9 (V = 8): the output is the warped
    target, never a token that warping removes."""
    params = SamplingParams(do_sample=True, temperature=0.8, top_k=5, top_p=0.9)
    g = torch.Generator().manual_seed(60)
    target = Table(torch.randn(8, generator=g, dtype=torch.float64), random_rows(8, 61, scale=0.7))
    draft = Table(torch.randn(8, generator=g, dtype=torch.float64), random_rows(8, 62, scale=0.7)).warped(params)
    res = run_trials(WIDTH2_DEPTH2, target, params, n=20_000, k=2, seed=10, draft=draft)
    expected = target_joint(target, params, 2)
    assert int((expected == 0).sum()) > 8 * 3  # warping removed tokens: zero cells really are checked
    assert_matches(res.counts, expected, "top-k/top-p warping")


# ---------------------------------------------------------------- power: wrong rules must fail the same test


def _chi_square(res: Result, expected: torch.Tensor) -> tuple[float, float]:
    stat, df = chi_square_gof(res.counts, expected)
    return stat, chi2_critical(df)


def test_power_resampling_from_p_instead_of_residual_fails(monkeypatch):
    """Wrong rule: after a rejection, sample from p instead of norm(max(0, p - q)). Same case, same test: FAILS."""
    target, draft = classic_case()
    monkeypatch.setattr(R, "_residual", lambda p, q: p)
    res = run_trials(CHAIN1, target, SAMPLE, n=20_000, k=2, seed=1, draft=draft)
    stat, crit = _chi_square(res, target_joint(target, SAMPLE, 2))
    assert stat > crit, f"the test has no power: chi-square {stat:.1f} <= {crit:.1f}"


def test_power_siblings_as_if_with_replacement_fails(monkeypatch):
    """Wrong rule: siblings drawn without replacement, but the draft side is not updated after a rejection
    (q_{i+1} = q_i, as if drawn with replacement). Same wide-tree case, same test: FAILS."""
    target, draft = tree_case()
    monkeypatch.setattr(R, "_without", lambda q, token: q)
    res = run_trials(WIDE, target, SAMPLE, n=20_000, k=2, seed=3, draft=draft)
    stat, crit = _chi_square(res, target_joint(target, SAMPLE, 2))
    assert stat > crit, f"the test has no power: chi-square {stat:.1f} <= {crit:.1f}"


def test_power_point_mass_not_removed_after_rejection_fails(monkeypatch):
    """Wrong rule: a rejected deterministic candidate x keeps its mass (next sibling and recovered token drawn
    from p instead of p without x). Same deterministic case, same test: FAILS."""
    target = deterministic_case()
    monkeypatch.setattr(R, "_without", lambda q, token: q)
    res = run_trials(DET_PARENTS, target, SAMPLE, n=20_000, k=2, seed=8, fixed_tokens=DET_TOKENS)
    stat, crit = _chi_square(res, target_joint(target, SAMPLE, 2))
    assert stat > crit, f"the test has no power: chi-square {stat:.1f} <= {crit:.1f}"


def test_power_unwarped_target_fails():
    """Wrong target: drafts and rule without the requested warping (temperature 0.8, top_k=5, top_p=0.9), judged
    against the warped target: tokens that warping removes appear (and the fit fails)."""
    params = SamplingParams(do_sample=True, temperature=0.8, top_k=5, top_p=0.9)
    g = torch.Generator().manual_seed(60)
    target = Table(torch.randn(8, generator=g, dtype=torch.float64), random_rows(8, 61, scale=0.7))
    draft = Table(torch.randn(8, generator=g, dtype=torch.float64), random_rows(8, 62, scale=0.7)).warped(SAMPLE)
    res = run_trials(WIDTH2_DEPTH2, target, SAMPLE, n=5_000, k=1, seed=10, draft=draft)
    expected = target_joint(target, params, 1)
    assert int(res.counts[expected == 0].sum()) > 0
    stat, crit = _chi_square(res, expected)
    assert stat > crit


# ---------------------------------------------------------------- greedy equivalence, reproducibility, contracts


def _random_tree(seed: int, v: int = 8, with_probs: bool = True) -> tuple[DraftTree, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    parents, _ = S.topology_from_choices(S.choices_for_shape(3, 3))
    n = len(parents)
    tokens = torch.randint(0, v, (1, n), generator=g)
    logits = torch.randn(1, n, v, generator=g, dtype=torch.float64) * 2
    probs = torch.softmax(torch.randn(1, n, v, generator=g), -1) if with_probs else None
    return DraftTree(tokens, torch.tensor([parents]), probs), logits


def test_rejection_without_sampling_is_greedy():
    for seed in range(40):
        tree, logits = _random_tree(seed)
        # make some drafts match the argmax, so accepted paths are not all empty
        tree = DraftTree(torch.where(torch.rand(tree.tokens.shape, generator=torch.Generator().manual_seed(seed)) < 0.6,
                                     logits.argmax(-1).gather(1, tree.parents.clamp(min=0)), tree.tokens),
                         tree.parents, tree.draft_probs)
        want = A.greedy(tree, logits, SamplingParams(), None)
        for sampling in (None, SamplingParams(), SamplingParams(do_sample=False, temperature=0.5)):
            got = A.rejection(tree, logits, sampling, torch.Generator().manual_seed(seed))
            assert torch.equal(got.path, want.path) and torch.equal(got.next_token, want.next_token)
            assert torch.equal(got.num_accepted, want.num_accepted)


def test_same_seed_same_result_different_seed_differs():
    runs = {}
    for seed in (7, 7, 8):
        outs = []
        g = torch.Generator().manual_seed(seed)
        for t in range(30):
            tree, logits = _random_tree(100 + t, with_probs=t % 2 == 0)
            acc = R.speculative_sampling(tree, logits, SamplingParams(do_sample=True, top_p=0.95), g)
            outs.append((acc.path.tolist(), acc.next_token.tolist()))
        runs.setdefault(seed, []).append(outs)
    assert runs[7][0] == runs[7][1]
    assert runs[7][0] != runs[8][0]


def test_batched_trees_are_independent_rows():
    """A batch of two trees gives, row by row, what each tree gives alone with the same generator stream."""
    a, la = _random_tree(1)
    b, lb = _random_tree(2)
    batch = DraftTree(torch.cat([a.tokens, b.tokens]), torch.cat([a.parents, b.parents]),
                      torch.cat([a.draft_probs, b.draft_probs]))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    both = R.speculative_sampling(batch, torch.cat([la, lb]), SAMPLE, g1)
    one = R.speculative_sampling(a, la, SAMPLE, g2)
    two = R.speculative_sampling(b, lb, SAMPLE, g2)
    assert both.accepted_nodes(0) == one.accepted_nodes(0) and both.accepted_nodes(1) == two.accepted_nodes(0)
    assert both.next_token.tolist() == one.next_token.tolist() + two.next_token.tolist()


def test_draft_token_outside_its_own_q_is_refused():
    tree = DraftTree(torch.tensor([[0, 3]]), torch.tensor([[-1, 0]]), torch.tensor([[[0.5, 0.5, 0.0, 0.0]] * 2]))
    with pytest.raises(SpecdecError, match="draft_probs"):
        R.speculative_sampling(tree, torch.zeros(1, 2, 4), SAMPLE, torch.Generator().manual_seed(0))
