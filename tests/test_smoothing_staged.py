"""Staged certification at a target radius (DESIGN.md §7): soundness, the failure of unadjusted
looks, futility, sample savings, and the engine plumbing (only undecided images draw).

Closed-form base classifiers as in test_smoothing_soundness.py (tests/helpers.py; f_R depends on
u = w·z only). A certificate is wrong when it is issued (any look's, whatever made the image stop)
and its class is not g_R(x) or its radius exceeds the true radius. The target radius is set to the
true radius, the worst case for a sequential design: it certifies exactly when some look's bound
overshoots.

Exact: for K = 2 the cumulative counts (n_c, n_R) of look s live on a grid; the mass still going at
look s is convolved with the pmf of the next stage's fresh draws (an independent multinomial
increment), so P(wrong certificate | ĉ = c) is a finite sum over the grid for every look.
"""
import numpy as np
import pytest
import torch
from helpers import BAND, ISLAND, PLAIN, projected_copies, selection_probs, wrong
from scipy.signal import correlate, fftconvolve
from scipy.special import gammaln, xlogy
from scipy.stats import binom

from dsr_lightning.smoothing import (
    SmoothedClassifier,
    certify_details,
    certify_staged,
    check_stages,
    staged_look,
)

ALPHA, N0 = 0.01, 100  # N0 as in helpers.selection_probs
LOOKS20 = tuple(range(50, 1001, 50))  # 20 looks
TWO = ((40, 400), (0.3, 0.7))  # a two-look design small enough to enumerate on a 2-D grid
BRIEF = ((100, 1000, 10_000), (0.1, 0.2, 0.7))  # DESIGN.md §7's example


# ---------------------------------------------------------------- exact probabilities (K = 2)

def grid(n, c, p, K=2):
    """Cumulative counts of n draws given ĉ = c: cell [i, j] has n_c = i, n_R = j, the rest in the
    other real class. Returns counts (n+1, J, K+1), valid cells (i + j <= n), and their trinomial
    pmf. J = 1 when the model never rejects (p_R = 0): then the grid is 1-D."""
    J = n + 1 if p[K] > 0 else 1
    i, j = np.meshgrid(np.arange(n + 1), np.arange(J), indexing="ij")
    ok = i + j <= n
    r = np.maximum(n - i - j, 0)
    logpmf = (gammaln(n + 1) - gammaln(i + 1) - gammaln(j + 1) - gammaln(r + 1)
              + xlogy(i, p[c]) + xlogy(j, p[K]) + xlogy(r, p[1 - c]))
    counts = np.zeros((*i.shape, K + 1), dtype=np.int64)
    counts[..., c], counts[..., K], counts[..., 1 - c] = i, j, r
    return counts, ok, np.where(ok, np.exp(np.where(ok, logpmf, 0.0)), 0.0)


def exact(model, t, c, stages, weights, alpha, bound, target, futility=True):
    """(P(wrong certificate | ĉ = c), P(stopped at some look)) of the staged design, exact."""
    p, K, (g, r_true) = model.probs(t), model.K, model.truth(t)
    assert K == 2
    p_wrong = p_stop = 0.0
    for s, n in enumerate(stages):
        counts, ok, pmf = grid(n, c, p)
        if s == 0:
            mass = pmf
        else:  # the mass still going, plus an independent increment of fresh draws
            inc = grid(n - stages[s - 1], c, p)[2]
            mass = np.clip(fftconvolve(mass, inc), 0.0, None)  # (n+1, J)
        cells = counts[ok]
        d, _, stop = staged_look(cells, np.full(len(cells), c), s, stages, weights, alpha,
                                 model.sigma, target, bound, futility)
        m = mass[ok]
        p_wrong += m[stop & wrong(d.prediction, d.radius, g, r_true)].sum()
        p_stop += m[stop].sum()
        mass[ok] = np.where(stop, 0.0, m)
    return p_wrong, p_stop


def exact_mixture(model, t, stages, weights, alpha, bound, target):
    """P(wrong certificate) for the actual selection ĉ = argmax of N0 draws."""
    sel = selection_probs(model, t)
    return sum(sel[c] * exact(model, t, c, stages, weights, alpha, bound, target)[0]
               for c in range(model.K))


def naive(stages, alpha):
    """Every look at the full α: the sound design at level S·α with equal weights."""
    return stages, (1 / len(stages),) * len(stages), alpha * len(stages)


T_PLAIN = [-0.1, 0.0, 0.1, 0.2, 0.24]
T_BAND = [-0.2, 0.0, 0.1, 0.2, 0.24]


@pytest.mark.parametrize("model, bound, design, ts, floor", [
    (PLAIN, "cohen", TWO, T_PLAIN, ALPHA / 10),
    (PLAIN, "cohen", (LOOKS20, (1 / 20,) * 20), T_PLAIN, ALPHA / 10),
    (BAND, "paper", TWO, T_BAND, 1e-4),
], ids=["plain-cohen-2", "plain-cohen-20", "band-paper-2"])
def test_exact_wrong_certificate_probability(model, bound, design, ts, floor):
    """<= α at every position and for either selected class; the checker is not blind (floor)."""
    worst = 0.0
    for t in ts:
        r = model.truth(t)[1]
        for c in range(model.K):
            p_wrong, p_stop = exact(model, t, c, *design, ALPHA, bound, r)
            assert p_stop == pytest.approx(1, abs=1e-9)  # every image stops, mass is conserved
            worst = max(worst, p_wrong)
    assert floor < worst <= ALPHA, worst


def test_exact_unadjusted_looks_fail():
    """20 looks each at α (plain Cohen, tight): ≈ 5 % wrong certificates, against <= 0.34 % for
    the same looks with α split, and <= α at one look of the full N (its own check)."""
    for t in T_PLAIN:
        r = PLAIN.truth(t)[1]
        bad = exact(PLAIN, t, 0, *naive(LOOKS20, ALPHA), "cohen", r)[0]
        good = exact(PLAIN, t, 0, LOOKS20, (1 / 20,) * 20, ALPHA, "cohen", r)[0]
        one = exact(PLAIN, t, 0, LOOKS20[-1:], (1.0,), ALPHA, "cohen", r)[0]
        assert bad > 3.5 * ALPHA and good < ALPHA / 2 and ALPHA / 2 < one <= ALPHA, (t, bad, good)


@pytest.mark.parametrize("model, bound", [(BAND, "paper"), (BAND, "cohen"), (PLAIN, "cohen")])
def test_futility_stops_exactly_the_hopeless(model, bound):
    """Two looks: a look-0 cell stops for futility iff no cell reachable from it at look 1 (add
    any increment of fresh draws) is certified; so futility never loses a certificate, and it
    does stop some cells (target 0.35: beyond reach from n_c = 0 at look 0, within from 40)."""
    (n1, n2), weights = TWO
    p, target = model.probs(0.0), 0.35
    for c in range(model.K):
        counts, ok, _ = grid(n1, c, p)
        d, cert0, stop0 = staged_look(counts[ok], np.full(ok.sum(), c), 0, (n1, n2), weights,
                                      ALPHA, model.sigma, target, bound)
        counts1, ok1, _ = grid(n2, c, p)
        cert1 = np.zeros(ok1.shape)
        cert1[ok1] = staged_look(counts1[ok1], np.full(ok1.sum(), c), 1, (n1, n2), weights,
                                 ALPHA, model.sigma, target, bound)[1]
        support = grid(n2 - n1, c, p)[1].astype(float)  # increments (a, b) with a + b <= n2 - n1
        reach = correlate(cert1, support, mode="valid", method="fft")[ok] > 0.5  # (cells,)
        futile = stop0 & ~cert0
        assert np.array_equal(futile, ~cert0 & ~reach)
        assert futile.any() and (~cert0 & reach).any() and cert1.any()


# ---------------------------------------------------------------- through the engine

def staged(model, t, M, design, alpha, bound, target, seed, **kw):
    base, x, g = projected_copies(model, t, M, seed)
    return certify_staged(base, x, N0, *design, alpha, model.sigma, target, batch_size=8192,
                          bound=bound, generator=g, allow_out_of_range=True, **kw)


@pytest.mark.parametrize("model, bound, t, sound, unadjusted", [
    (PLAIN, "cohen", 0.1, (LOOKS20, (1 / 20,) * 20), naive(LOOKS20, ALPHA)),
    (BAND, "paper", 0.0, TWO, None),
], ids=["plain-cohen-20", "band-paper-2"])
def test_end_to_end_wrong_certificates(model, bound, t, sound, unadjusted):
    """M images through the real noise, chunks, counting and stages: the number V of wrong
    certificates is plausible under Binomial(M, α) and under the exact rate; the unadjusted looks
    through the same path give far more than α allows, as their exact rate says."""
    M, (g, r) = 2000, model.truth(t)
    limit = binom.ppf(1 - 1e-6, M, ALPHA)  # 36
    cert = staged(model, t, M, sound, ALPHA, bound, r, seed=0)
    V = wrong(cert.prediction, cert.radius, g, r).sum()
    lo, hi = binom.interval(1 - 1e-6, M, exact_mixture(model, t, *sound, ALPHA, bound, r))
    assert V <= limit and lo <= V <= hi, (V, lo, hi)
    assert (cert.prediction == g).mean() > 0.5  # not vacuous: most images get g's certificate
    if unadjusted:
        stages, weights, level = unadjusted
        cert = staged(model, t, M, (stages, weights), level, bound, r, seed=1)
        V = wrong(cert.prediction, cert.radius, g, r).sum()
        lo, hi = binom.interval(1 - 1e-6, M, exact_mixture(model, t, stages, weights, level,
                                                           bound, r))
        assert V > limit and lo <= V <= hi, (V, lo, hi)


def test_end_to_end_island_runner_up():
    """K = 3 (no exact sum here): the runner-up bound through the stages, V plausible under α."""
    t, M = 0.0, 2000
    g, r = ISLAND.truth(t)
    cert = staged(ISLAND, t, M, TWO, ALPHA, "runner_up", r, seed=2)
    assert wrong(cert.prediction, cert.radius, g, r).sum() <= binom.ppf(1 - 1e-6, M, ALPHA)
    assert (cert.prediction == g).mean() > 0.5


def test_savings_at_a_radius_well_inside():
    """Target = half the true radius: every image certified, on average with < 10 % of the draws
    of fixed N = 10⁴, and every certificate checks against certify_details at its look's α."""
    M, t = 200, -0.25
    g, r = BAND.truth(t)  # 0.5
    cert = staged(BAND, t, M, BRIEF, ALPHA, "paper", r / 2, seed=3)
    stages, weights = BRIEF
    assert cert.certified.all() and (cert.prediction == g).all() and (cert.radius >= r / 2).all()
    assert cert.N.mean() < 0.1 * stages[-1], cert.N.mean()
    assert (cert.stage < 2).all() and (cert.stage == 0).any()
    np.testing.assert_array_equal(cert.N, np.asarray(stages)[cert.stage])
    np.testing.assert_array_equal(cert.draws, N0 + cert.N)
    np.testing.assert_array_equal(cert.counts.sum(1), cert.N)
    np.testing.assert_array_equal(cert.counts0.sum(1), N0)
    for s in np.unique(cert.stage):
        at = cert.stage == s
        d = certify_details(cert.counts[at], cert.c_hat[at], BAND.sigma, ALPHA * weights[s],
                            "paper")
        np.testing.assert_allclose(cert.radius[at], d.radius, rtol=1e-12)
        np.testing.assert_array_equal(cert.pA_lower[at], d.pA_lower)


def test_futility_stops_hopeless_images_early():
    """p_A = ½ (on the boundary), target 0.5 = 2σ: no image can reach it; all stop at look 1
    (1,000 draws, where even 9,000 more votes for ĉ could not reach it), not at 10,000. Without
    futility the same images run to the end and none is certified either."""
    M, t = 50, 0.25
    cert = staged(PLAIN, t, M, BRIEF, ALPHA, "cohen", 0.5, seed=4)
    assert not cert.certified.any() and (cert.stage == 1).all() and (cert.N == 1000).all()
    full = staged(PLAIN, t, M, BRIEF, ALPHA, "cohen", 0.5, seed=4, futility=False)
    assert not full.certified.any() and (full.N == 10_000).all()
    np.testing.assert_array_equal(cert.draws, N0 + 1000)


class Tagged(torch.nn.Module):
    """Image i is the constant 100·i; even images always vote 0 (certified at the first look),
    odd ones flip a fair coin on one noise pixel (they go on). Records each chunk's image ids."""
    num_classes = 2

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, z):
        img = torch.round(z.mean((1, 2, 3)) / 100).long()
        self.seen.append(img)
        return torch.where(img % 2 == 0, 0, (z[:, 0, 0, 0] > 100 * img).long())


def test_only_undecided_images_draw_and_stages_are_fresh():
    B, stages, weights = 6, (30, 90, 300), (0.2, 0.3, 0.5)
    x = 100 * torch.arange(B, dtype=torch.float32).view(B, 1, 1, 1).expand(B, 3, 4, 4)
    base = Tagged()
    cert = certify_staged(base, x, 10, stages, weights, 0.05, 0.25, 0.2, batch_size=64,
                          bound="cohen", generator=torch.Generator().manual_seed(0),
                          allow_out_of_range=True)
    seen = np.bincount(torch.cat(base.seen).numpy(), minlength=B)
    np.testing.assert_array_equal(seen, cert.draws)  # each image drew N0 + its stopping stage
    np.testing.assert_array_equal(cert.stage[::2], 0)  # the even ones stopped at once
    assert (cert.stage[1::2] > 0).all() and cert.certified[::2].all()
    assert max(len(s) for s in base.seen) == 64  # chunks mix images
    again = certify_staged(Tagged(), x, 10, stages, weights, 0.05, 0.25, 0.2, batch_size=64,
                           bound="cohen", generator=torch.Generator().manual_seed(0),
                           allow_out_of_range=True)
    for k, v in cert.columns().items():  # deterministic
        np.testing.assert_array_equal(v, again.columns()[k], err_msg=k)


def test_one_stage_is_fixed_n():
    """stages = (N,), weights = (1,): the same draws and certificate as SmoothedClassifier.certify."""
    base, x, _ = projected_copies(BAND, 0.1, 20, seed=5)
    fixed = SmoothedClassifier(base, sigma=BAND.sigma, allow_out_of_range=True).certify(
        x, N0, 500, ALPHA, 4096, "paper", torch.Generator().manual_seed(6))
    target = float(np.median(fixed.radius))
    one = certify_staged(base, x, N0, (500,), (1.0,), ALPHA, BAND.sigma, target, 4096, "paper",
                         generator=torch.Generator().manual_seed(6), allow_out_of_range=True)
    np.testing.assert_array_equal(one.counts, fixed.counts)
    np.testing.assert_array_equal(one.radius, fixed.radius)
    np.testing.assert_array_equal(one.prediction, fixed.prediction)
    np.testing.assert_array_equal(one.certified, fixed.radius >= target)
    assert one.certified.any() and not one.certified.all()


def test_no_images():
    base, x, _ = projected_copies(BAND, 0.1, 1, seed=0)
    cert = certify_staged(base, x[:0], N0, *BRIEF, ALPHA, 0.25, 0.1, 64)
    assert cert.prediction.shape == cert.stage.shape == cert.draws.shape == (0,)


@pytest.mark.parametrize("stages, weights, match", [
    ((), (), "non-empty"),
    (100, (1.0,), "non-empty list"),
    ((100, 100), (0.5, 0.5), "strictly increasing"),
    ((1000, 100), (0.5, 0.5), "strictly increasing"),
    ((0, 100), (0.5, 0.5), "integer >= 1"),
    ((10.5, 100), (0.5, 0.5), "integer >= 1"),
    ((100, 1000), (0.5,), "one weight per stage"),
    ((100, 1000), (0.5, 0.6), "sum to 1"),
    ((100, 1000), (1.5, -0.5), "> 0"),
    ((100, 1000), (0.0, 1.0), "> 0"),
    ((100, 1000), "ab", "list of numbers"),
])
def test_bad_stages(stages, weights, match):
    with pytest.raises(ValueError, match=match):
        check_stages(stages, weights)


def test_bad_input():
    base, x, _ = projected_copies(BAND, 0.1, 2, seed=0)
    with pytest.raises(ValueError, match="radius"):
        certify_staged(base, x, N0, *BRIEF, ALPHA, 0.25, 0.0, 64)
    with pytest.raises(ValueError, match="alpha"):
        certify_staged(base, x, N0, *BRIEF, 1.0, 0.25, 0.1, 64)
    with pytest.raises(ValueError, match="sum to stages"):
        staged_look(np.array([[5, 3, 1]]), np.array([0]), 0, *BRIEF, ALPHA, 0.25, 0.1)
    assert check_stages([100, 1000], [0.3, 0.7 + 1e-9])[1] == pytest.approx((0.3, 0.7))
