"""Clopper–Pearson bounds, the three certificates and Algorithm 1 on counts (pure numpy/scipy)."""
import warnings

import numpy as np
import pytest
from scipy.stats import binom, binomtest, norm
from statsmodels.stats.proportion import proportion_confint

from dsr_lightning.smoothing import (
    ABSTAIN,
    BOUNDS,
    certify_counts,
    certify_details,
    check_alpha,
    check_positive,
    check_positive_int,
    cp_lower,
    cp_upper,
    predict_counts,
)


def random_counts(rng, shape, K, N):
    """Counts (*shape, K+1) of N draws from random class probabilities (some peaked)."""
    p = rng.dirichlet(np.full(K + 1, 0.3), size=shape)
    return np.stack([rng.multinomial(N, q) for q in p.reshape(-1, K + 1)]).reshape(*shape, K + 1)


# ---------------------------------------------------------------- Clopper–Pearson

@pytest.mark.parametrize("n", [1, 7, 100, 1000])
@pytest.mark.parametrize("alpha", [0.001, 0.005, 0.05])
def test_cp_matches_statsmodels(n, alpha):
    k = np.arange(n + 1)
    lo, hi = proportion_confint(k, n, alpha=2 * alpha, method="beta")  # two-sided at 2α
    np.testing.assert_allclose(cp_lower(k, n, alpha), np.nan_to_num(lo, nan=0.0), atol=1e-12)
    np.testing.assert_allclose(cp_upper(k, n, alpha), np.nan_to_num(hi, nan=1.0), atol=1e-12)


def test_cp_edges_and_broadcasting():
    n, a = 50, 0.01
    assert cp_lower(0, n, a) == 0 and cp_upper(n, n, a) == 1
    assert cp_lower(n, n, a) == pytest.approx(a ** (1 / n)) and cp_lower(n, n, a) < 1
    assert cp_upper(0, n, a) == pytest.approx(1 - a ** (1 / n))
    assert np.isfinite(norm.ppf(cp_lower(10_000, 10_000, 1e-6)))
    assert cp_lower(np.array([[1], [2]]), np.array([3, 4, 5]), a).shape == (2, 3)
    k = np.arange(n + 1)
    assert np.all(np.diff(cp_lower(k, n, a)) > 0) and np.all(np.diff(cp_upper(k, n, a)) > 0)


@pytest.mark.parametrize("n", [20, 300])
def test_cp_exact_coverage(n):
    """P(cp_lower(k) > p) <= α and P(cp_upper(k) < p) <= α for every p (exact sum)."""
    alpha, k = 0.01, np.arange(n + 1)
    lo, hi = cp_lower(k, n, alpha), cp_upper(k, n, alpha)
    p = np.linspace(0, 1, 2001)[:, None]  # (P, 1)
    pmf = binom.pmf(k, n, p)  # (P, n+1)
    assert (pmf * (lo > p)).sum(1).max() <= alpha + 1e-12
    assert (pmf * (hi < p)).sum(1).max() <= alpha + 1e-12
    assert (pmf * (lo > p)).sum(1).max() > alpha / 3  # not vacuous: CP is tight-ish


# ---------------------------------------------------------------- certificates

def test_cohen_matches_reference_formula():
    rng = np.random.default_rng(0)
    sigma, alpha, N = 0.5, 0.001, 1000
    counts = random_counts(rng, (500,), K=10, N=N)
    counts[:, -1] = 0  # no rejector
    counts[:, 0] += N - counts.sum(1)
    c_hat = counts[:, :-1].argmax(1)
    pred, radius = certify_counts(counts, c_hat, sigma, alpha, "cohen")
    n_A = counts[np.arange(500), c_hat]
    pA = proportion_confint(n_A, N, alpha=2 * alpha, method="beta")[0]
    pA = np.nan_to_num(pA, nan=0.0)
    ok = pA > 0.5
    assert 50 < ok.sum() < 450  # both branches exercised
    np.testing.assert_array_equal(pred, np.where(ok, c_hat, ABSTAIN))
    np.testing.assert_allclose(radius, np.where(ok, sigma * norm.ppf(pA), 0.0), rtol=1e-10)


def test_paper_matches_theorem_formula():
    counts = np.array([[700, 100, 200], [400, 100, 500], [300, 400, 300]])
    c_hat, sigma, alpha = np.array([0, 0, 0]), 0.25, 0.01
    pred, radius = certify_counts(counts, c_hat, sigma, alpha, "paper")
    pA = proportion_confint(counts[:, 0], 1000, alpha=alpha, method="beta")[0]
    pAR = proportion_confint(counts[:, 0] + counts[:, 2], 1000, alpha=alpha, method="beta")[0]
    rho = sigma / 2 * (norm.ppf(pA) + norm.ppf(pAR))
    np.testing.assert_allclose(radius, np.where(rho > 0, rho, 0.0), rtol=1e-10)
    np.testing.assert_array_equal(pred, [0, 0, ABSTAIN])  # the last has p_A < p_B


def test_runner_up_dominates_paper_and_equals_it_for_two_classes():
    rng = np.random.default_rng(1)
    for K in (2, 3, 10):
        counts = random_counts(rng, (40, 25), K=K, N=500)  # leading dims (40, 25)
        c_hat = rng.integers(0, K, size=(40, 25))
        c_hat[:20] = counts[:20, :, :-1].argmax(-1)
        p_pred, p_rad = certify_counts(counts, c_hat, 0.5, 0.01, "paper")
        r_pred, r_rad = certify_counts(counts, c_hat, 0.5, 0.01, "runner_up")
        assert (p_pred != ABSTAIN).sum() > 100
        assert np.all(r_rad >= p_rad - 1e-12)
        assert np.all(r_pred[p_pred != ABSTAIN] == p_pred[p_pred != ABSTAIN])
        if K == 2:  # the one other class is all of the non-(A or R) mass
            np.testing.assert_allclose(r_rad, p_rad, rtol=1e-9, atol=1e-12)
        else:
            assert (r_rad > p_rad + 0.05).sum() > 10


def test_details_fields_edges_and_no_warnings():
    counts = np.array([[1000, 0, 0], [0, 0, 1000], [0, 1000, 0], [0, 0, 0], [500, 200, 300]])
    c_hat = np.array([0, 0, 0, 1, 0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d = {b: certify_details(counts, c_hat, 0.5, 0.001, b) for b in BOUNDS}
    for b, det in d.items():
        assert np.all(np.isfinite(det.radius)) and det.radius[0] > 0  # n_A = N: finite radius
        np.testing.assert_array_equal(det.prediction[1:4], ABSTAIN)
        np.testing.assert_array_equal(det.radius[1:4], 0.0)
        np.testing.assert_array_equal(det.n_A, [1000, 0, 0, 0, 500])
        np.testing.assert_array_equal(det.n_R, [0, 1000, 0, 0, 300])
        np.testing.assert_array_equal(det.n_B, [0, 0, 1000, 0, 200])
        np.testing.assert_array_equal(det.N, [1000, 1000, 1000, 0, 1000])
        assert list(det.columns())[:2] == ["prediction", "radius"] and det.bound == b
    assert np.isnan(d["paper"].pB_upper).all() and np.isnan(d["runner_up"].pAR_lower).all()
    assert np.isnan(d["cohen"].pAR_lower).all() and np.isnan(d["cohen"].pB_upper).all()
    # reject band counts: 'paper' certifies where 'cohen' (R counted against A) cannot
    assert d["paper"].prediction[4] == 0 and d["cohen"].prediction[4] == ABSTAIN
    assert d["paper"].pAR_lower[4] == pytest.approx(cp_lower(800, 1000, 0.0005))


def test_single_real_class_and_scalar_input():
    pred, radius = certify_counts(np.array([90, 10]), np.array(0), 1.0, 0.01, "runner_up")
    assert pred.shape == () and pred == 0 and radius > 0


# ---------------------------------------------------------------- Algorithm 1

def test_predict_matches_binomtest_and_ignores_reject():
    rng = np.random.default_rng(2)
    counts = random_counts(rng, (300,), K=4, N=60)
    pred = predict_counts(counts, 0.05)
    for c, p in zip(counts, pred):
        real = c[:-1]
        a, b = np.sort(real)[::-1][:2]
        ok = a + b > 0 and binomtest(int(a), int(a + b), 0.5).pvalue <= 0.05
        assert p == (int(np.argmax(real)) if ok else ABSTAIN)
    assert ((pred != ABSTAIN).mean() > 0.2) and ((pred == ABSTAIN).mean() > 0.1)
    assert predict_counts(np.array([0, 0, 0, 50]), 0.05) == ABSTAIN  # n_A + n_B = 0
    assert predict_counts(np.array([30, 0, 0, 5000]), 0.05) == 0  # R is never the answer
    assert predict_counts(np.array([20, 20, 0]), 0.5) == ABSTAIN  # tie: p-value 1


def test_predict_error_rate_near_tie():
    """Simulated Algorithm 1 at p_A = 0.36 > p_B = 0.34 (p_R = 0.3): wrong answers <= α; the
    bare argmax (no test) is wrong far more often, so the check has teeth."""
    rng, alpha, M, N = np.random.default_rng(3), 0.01, 4000, 1000
    counts = rng.multinomial(N, [0.36, 0.34, 0.30], size=M)
    limit = binom.ppf(1 - 1e-6, M, alpha)
    wrong = (predict_counts(counts, alpha) == 1).sum()
    assert wrong <= limit
    assert (counts[:, :-1].argmax(1) == 1).sum() > 5 * limit


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs, match", [
    (dict(alpha=0.0), "alpha"), (dict(alpha=1.0), "alpha"), (dict(alpha=float("nan")), "alpha"),
    (dict(sigma=0.0), "sigma"), (dict(sigma=-1.0), "sigma"), (dict(bound="bonferroni"), "cohen"),
    (dict(counts=np.array([5])), "columns"), (dict(counts=np.array([[5, -1, 0]])), "negative"),
    (dict(counts=np.array([[5.0, 1.0, 0.0]])), "integers"),
    (dict(c_hat=np.array([0, 0])), "shape"), (dict(c_hat=np.array([2])), "reject column"),
    (dict(c_hat=np.array([-1])), "real class"),
])
def test_certify_bad_input(kwargs, match):
    args = dict(counts=np.array([[5, 1, 0]]), c_hat=np.array([0]), sigma=0.5, alpha=0.01,
                bound="paper") | kwargs
    with pytest.raises(ValueError, match=match):
        certify_details(**args)


def test_bad_input_helpers():
    for f, bad in [(check_alpha, [0, 1, -0.1, True, "0.1", None]),
                   (lambda v: check_positive_int("n0", v), [0, -3, 1.5, True, "10"]),
                   (lambda v: check_positive("sigma", v), [0, -0.1, float("inf"), True])]:
        for v in bad:
            with pytest.raises(ValueError):
                f(v)
    assert check_positive_int("n", np.int64(5)) == 5 and check_alpha(0.001) == 0.001
    with pytest.raises(ValueError, match="n0 must be"):
        check_positive_int("n0", 0)
    with pytest.raises(ValueError, match="0 <= k <= n"):
        cp_lower(5, 4, 0.01)
    with pytest.raises(ValueError, match="alpha"):
        cp_upper(1, 4, 1.5)
    with pytest.raises(ValueError, match="alpha"):
        predict_counts(np.array([[3, 1, 0]]), 0.0)
