"""DeLong and paired-bootstrap tests, checked against the definition and scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm, rankdata
from sklearn.metrics import average_precision_score, roc_auc_score

from wsi_lightning.analysis.stats import (
    auc_ci,
    batched_ap,
    batched_auc,
    bootstrap_indices,
    bootstrap_test,
    compare_to_reference,
    delong_test,
    delong_variance,
    midranks,
)


def _data(n: int = 200, seed: int = 0, sep_a: float = 1.0, sep_b: float = 1.0,
          ties: bool = False, corr: float = 0.5):
    """Labels and two correlated noisy scores; ``ties`` rounds scores to create many ties."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    shared = rng.normal(size=n)
    a = sep_a * y + corr * shared + rng.normal(size=n)
    b = sep_b * y + corr * shared + rng.normal(size=n)
    if ties:
        a, b = np.round(a, 0), np.round(b, 0)
    return y, a, b


def _slow_delong(y, a, b):
    """DeLong et al. (1988) from the definition: psi(x, y) = 1 if x > y, 1/2 if equal, else 0.

    V10[i] = mean_j psi(X_i, Y_j), V01[j] = mean_i psi(X_i, Y_j) (X positives, Y negatives);
    S = S10 / m + S01 / n with S10, S01 the sample covariance matrices (ddof=1) over models.
    """
    comps10, comps01, aucs = [], [], []
    for s in (a, b):
        x, yy = s[y == 1], s[y == 0]
        psi = (x[:, None] > yy[None, :]) + 0.5 * (x[:, None] == yy[None, :])  # (m, n)
        comps10.append(psi.mean(1))
        comps01.append(psi.mean(0))
        aucs.append(psi.mean())
    m, n = len(comps10[0]), len(comps01[0])
    cov = np.cov(np.stack(comps10)) / m + np.cov(np.stack(comps01)) / n
    diff = aucs[0] - aucs[1]
    z = diff / np.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    return aucs[0], aucs[1], cov, z, 2 * norm.sf(abs(z))


# --------------------------------------------------------------------------- DeLong


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_delong_matches_definition(seed: int, ties: bool):
    y, a, b = _data(n=150, seed=seed, sep_b=0.6, ties=ties)
    if ties:
        assert len(np.unique(a)) < 20  # many ties, within and across classes
    auc_a, auc_b, cov, z, p = _slow_delong(y, a, b)
    r = delong_test(y, a, b)
    np.testing.assert_allclose([r.auc_a, r.auc_b], [auc_a, auc_b], rtol=1e-12)
    np.testing.assert_allclose([r.var_a, r.var_b, r.cov], [cov[0, 0], cov[1, 1], cov[0, 1]],
                               rtol=1e-10)
    np.testing.assert_allclose([r.z, r.p_value], [z, p], rtol=1e-9)
    assert r.diff == pytest.approx(auc_a - auc_b)
    assert r.auc_a == pytest.approx(roc_auc_score(y, a), abs=1e-12)
    assert r.auc_b == pytest.approx(roc_auc_score(y, b), abs=1e-12)
    assert delong_variance(y, a) == pytest.approx((auc_a, cov[0, 0]), rel=1e-10)


def test_delong_hand_computed():
    # Positives (y=1) A: 0.9, 0.8, 0.4 ; negatives A: 0.7, 0.4, 0.1 (one tie at 0.4).
    #   V10_A = [1, 1, (0 + .5 + 1)/3 = .5]; AUC_A = 2.5/3 = 5/6.
    #   V01_A = [2/3, 2.5/3 = 5/6, 1].
    #   S10_A = var([1, 1, .5]) = (1/36 + 1/36 + 4/36)/2 = 1/12;
    #   S01_A = (1/36 + 0 + 1/36)/2 = 1/36.
    #   var_A = S10/3 + S01/3 = 1/36 + 1/108 = 1/27.
    # B: positives 0.6, 0.5, 0.2 ; negatives 0.3, 0.1, 0.4.
    #   V10_B = [1, 1, 1/3]; AUC_B = 7/9; V01_B = [2/3, 1, 2/3].
    #   S10_B = (4/81 + 4/81 + 16/81)/2 = 4/27; S01_B = (1/81 + 4/81 + 1/81)/2 = 1/27.
    #   var_B = 4/81 + 1/81 = 5/81.
    # cov: S10_AB = (1/6*2/9 * 2 + 1/3*4/9)/2 = 1/9; S01_AB = (1/54 + 0 - 1/54)/2 = 0.
    #   cov = (1/9)/3 + 0 = 1/27.
    # diff = 5/6 - 7/9 = 1/18; var_diff = 1/27 + 5/81 - 2/27 = 2/81;
    # z = (1/18) / (sqrt(2)/9) = 1/(2 sqrt 2).
    y = np.array([1, 1, 1, 0, 0, 0])
    a = np.array([0.9, 0.8, 0.4, 0.7, 0.4, 0.1])
    b = np.array([0.6, 0.5, 0.2, 0.3, 0.1, 0.4])
    r = delong_test(y, a, b)
    assert r.auc_a == pytest.approx(5 / 6) and r.auc_b == pytest.approx(7 / 9)
    assert r.var_a == pytest.approx(1 / 27) and r.var_b == pytest.approx(5 / 81)
    assert r.cov == pytest.approx(1 / 27)
    assert r.diff == pytest.approx(1 / 18)
    assert r.z == pytest.approx(1 / (2 * np.sqrt(2)))
    assert r.p_value == pytest.approx(2 * norm.sf(1 / (2 * np.sqrt(2))))  # ~0.7237
    assert delong_variance(y, a) == pytest.approx((5 / 6, 1 / 27))


def test_delong_identical_symmetric_and_powerful():
    y, a, b = _data(n=200, seed=3, sep_a=2.5, sep_b=0.3)
    same = delong_test(y, a, a)
    assert same.diff == 0.0 and same.z == 0.0 and same.p_value == 1.0
    r, swapped = delong_test(y, a, b), delong_test(y, b, a)
    assert r.p_value < 0.01 and r.diff > 0
    assert swapped.p_value == pytest.approx(r.p_value)
    assert swapped.diff == pytest.approx(-r.diff) and swapped.z == pytest.approx(-r.z)
    assert (swapped.var_a, swapped.var_b, swapped.cov) == pytest.approx((r.var_b, r.var_a, r.cov))


def test_delong_size_under_null():
    """Two equally good, correlated classifiers: about 5% of p-values below 0.05."""
    p = np.array([delong_test(*_data(n=120, seed=s)).p_value for s in range(300)])
    assert 0.02 <= (p < 0.05).mean() <= 0.09
    assert 0.4 <= np.median(p) <= 0.6


def test_delong_degenerate_and_errors():
    y = np.array([0, 0, 1, 1])
    r = delong_test(y, [0.1, 0.2, 0.8, 0.9], [0.5, 0.5, 0.5, 0.5])  # perfect vs constant
    assert r.diff == 0.5 and r.p_value == 0.0 and r.z == np.inf
    with pytest.raises(ValueError, match="at least 2 positive"):
        delong_test([0, 0, 1], [0.1, 0.2, 0.3], [0.3, 0.2, 0.1])
    with pytest.raises(ValueError, match="binary 0/1"):
        delong_test([0, 2, 1, 1], [0.1, 0.2, 0.3, 0.4], [0.3, 0.2, 0.1, 0.4])
    with pytest.raises(ValueError, match="score_b has shape"):
        delong_test(y, [0.1, 0.2, 0.3, 0.4], [0.3, 0.2, 0.1])
    with pytest.raises(ValueError, match="NaN"):
        delong_test(y, [0.1, np.nan, 0.3, 0.4], [0.3, 0.2, 0.1, 0.4])


def test_auc_ci():
    y, a, _ = _data(n=200, seed=4, sep_a=1.5)
    auc, var = delong_variance(y, a)
    plain = auc_ci(y, a, method="normal")
    half = norm.isf(0.025) * np.sqrt(var)
    assert plain == pytest.approx((auc, auc - half, auc + half))
    logit = auc_ci(y, a)
    assert logit.auc == auc and logit.low < auc < logit.high
    assert logit.high - logit.low == pytest.approx(2 * half, rel=0.05)  # close to Wald at n=200
    assert auc_ci(y, a, alpha=0.01).low < logit.low
    assert tuple(auc_ci([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4])) == (1.0, 1.0, 1.0)
    hi = auc_ci(*_data(n=60, seed=5, sep_a=2.0)[:2])  # AUC ~0.95: logit CI is asymmetric
    assert 0.0 < hi.low < hi.auc < hi.high < 1.0 and hi.high - hi.auc < hi.auc - hi.low


# --------------------------------------------------------------------------- ranks, AUC, AP


def test_midranks_batched_auc_ap_match_reference():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 6, size=(5, 40)).astype(float)  # heavy ties
    np.testing.assert_array_equal(midranks(x), rankdata(x, method="average", axis=-1))
    y = rng.integers(0, 2, size=(5, 40))
    for s in (x, rng.normal(size=(5, 40))):
        rows = list(zip(y, s, strict=True))
        np.testing.assert_allclose(batched_auc(y, s), [roc_auc_score(*r) for r in rows])
        np.testing.assert_allclose(batched_ap(y, s), [average_precision_score(*r) for r in rows])
    y[0] = 0
    assert np.isnan(batched_auc(y, x)[0]) and np.isnan(batched_ap(y, x)[0])


@pytest.mark.parametrize("stratified", [True, False])
def test_bootstrap_replicates_match_sklearn(stratified: bool):
    y, a, _ = _data(n=80, seed=6, ties=True)
    idx = bootstrap_indices(y, n_boot=50, seed=1, stratified=stratified)  # (50, 80)
    assert idx.shape == (50, 80)
    got_auc, got_ap = batched_auc(y[idx], a[idx]), batched_ap(y[idx], a[idx])
    for k in (0, 17, 49):
        if 0 < y[idx[k]].sum() < len(y):
            assert got_auc[k] == pytest.approx(roc_auc_score(y[idx[k]], a[idx[k]]))
            assert got_ap[k] == pytest.approx(average_precision_score(y[idx[k]], a[idx[k]]))


def test_stratification_keeps_class_counts():
    y = np.array([1] * 3 + [0] * 27)
    idx = bootstrap_indices(y, n_boot=500, seed=0)
    np.testing.assert_array_equal(y[idx].sum(1), 3)
    free = bootstrap_indices(y, n_boot=500, seed=0, stratified=False)
    assert (y[free].sum(1) == 0).any()  # unstratified: some replicates lose the positives
    s = np.linspace(0, 1, 30)
    r = bootstrap_test(y, s, s[::-1], n_boot=500, stratified=False)
    assert r.n_valid == (y[free].sum(1) > 0).sum() < 500
    assert bootstrap_test(y, s, s[::-1], n_boot=500).n_valid == 500


# --------------------------------------------------------------------------- bootstrap test


def test_bootstrap_null_and_alternative():
    y, a, b = _data(n=200, seed=7)  # same distribution, independent noise
    for metric in ("auc", "ap"):
        r = bootstrap_test(y, a, b, metric)
        assert r.p_value > 0.1, (metric, r)
        assert r.ci_low < 0 < r.ci_high and r.n_valid == 2000
        assert r.stat_a == pytest.approx(
            roc_auc_score(y, a) if metric == "auc" else average_precision_score(y, a))
    y, a, b = _data(n=200, seed=8, sep_a=2.5, sep_b=0.5)
    for metric in ("auc", "ap"):
        for p_method in ("percentile", "shifted", "normal"):
            r = bootstrap_test(y, a, b, metric, p_method=p_method)
            assert r.p_value < 0.01 and r.diff > 0 and r.ci_low > 0, (metric, p_method, r)
    same = bootstrap_test(y, a, a)
    assert same.p_value == 1.0 and same.diff == 0.0 and same.ci_low == same.ci_high == 0.0


def test_bootstrap_percentile_p_definition_and_seed():
    y, a, b = _data(n=100, seed=9, sep_a=1.2, sep_b=0.9)
    r = bootstrap_test(y, a, b, n_boot=1000, seed=3)
    assert r == bootstrap_test(y, a, b, n_boot=1000, seed=3)  # reproducible
    assert r != bootstrap_test(y, a, b, n_boot=1000, seed=4)
    idx = bootstrap_indices(y, 1000, seed=3)
    d = batched_auc(y[idx], a[idx]) - batched_auc(y[idx], b[idx])
    tail = min((d <= 0).sum(), (d >= 0).sum())
    assert r.p_value == pytest.approx(min(1.0, 2 * (tail + 1) / 1001))
    assert (r.ci_low, r.ci_high) == pytest.approx(tuple(np.quantile(d, [0.025, 0.975])))
    shifted = bootstrap_test(y, a, b, n_boot=1000, seed=3, p_method="shifted")
    assert shifted.p_value == pytest.approx(((np.abs(d - r.diff) >= abs(r.diff)).sum() + 1) / 1001)


def test_bootstrap_callable_metric_matches_builtin():
    y, a, b = _data(n=60, seed=10, sep_a=1.5)
    fast = bootstrap_test(y, a, b, "auc", n_boot=200, seed=0)
    slow = bootstrap_test(y, a, b, roc_auc_score, n_boot=200, seed=0)
    assert (slow.stat_a, slow.stat_b, slow.ci_low, slow.ci_high) == pytest.approx(
        (fast.stat_a, fast.stat_b, fast.ci_low, fast.ci_high))
    assert slow.p_value == pytest.approx(fast.p_value, abs=0.02)
    with pytest.raises(ValueError, match="metric must be"):
        bootstrap_test(y, a, b, "f1")


# --------------------------------------------------------------------------- table


def test_compare_to_reference():
    y, ref, close = _data(n=150, seed=12, sep_a=2.0, sep_b=2.0)  # same distribution
    weak = 0.3 * y + np.random.default_rng(99).normal(size=len(y))
    preds = {"cs_mil": (y, ref), "abmil": (y, weak), "dsmil": (list(y), close)}
    df = compare_to_reference(preds, "cs_mil", n_boot=300)
    assert list(df.columns) == ["AUC", "AP", "p_delong", "p_boot_auc", "p_boot_ap"]
    assert list(df.index) == ["cs_mil", "abmil", "dsmil"] and df.index.name == "model"
    assert df.loc["cs_mil", ["p_delong", "p_boot_auc", "p_boot_ap"]].isna().all()
    assert df.loc["abmil", "AUC"] == pytest.approx(roc_auc_score(y, weak))
    assert df.loc["abmil", "AP"] == pytest.approx(average_precision_score(y, weak))
    assert df.loc["abmil", "p_delong"] == pytest.approx(delong_test(y, weak, ref).p_value)
    assert (df.loc["abmil", ["p_delong", "p_boot_auc", "p_boot_ap"]] < 0.01).all()
    assert (df.loc["dsmil", ["p_delong", "p_boot_auc", "p_boot_ap"]] > 0.05).all()


def test_compare_to_reference_validates_alignment():
    y, a, b = _data(n=50, seed=13)
    with pytest.raises(ValueError, match="reference 'x' is not among"):
        compare_to_reference({"a": (y, a)}, "x")
    with pytest.raises(ValueError, match="align the predictions on slide_id"):
        compare_to_reference({"a": (y, a), "b": (y[:-1], b[:-1])}, "a")
    y2 = y.copy()
    y2[[3, 7]] = 1 - y2[[3, 7]]
    with pytest.raises(ValueError, match="differ from reference 'a' at 2 slides"):
        compare_to_reference({"a": (y, a), "b": (y2, b)}, "a")
