"""Comparing two classifiers on the same test slides: DeLong and paired-bootstrap tests.

CS-MIL's Table 2 reports, for every baseline, a "bootstrapped two-tailed test and DeLong test
against CS-MIL". :func:`compare_to_reference` builds that table from per-slide predictions.

* :func:`delong_test` -- DeLong, DeLong & Clarke-Pearson (1988), "Comparing the areas under two
  or more correlated receiver operating characteristic curves: a nonparametric approach",
  Biometrics 44(3). The structural components (placements) are computed with midranks in
  O(n log n) following Sun & Xu (2014), "Fast implementation of DeLong's algorithm for comparing
  the areas under correlated receiver operating characteristic curves", IEEE SPL 21(11).
* :func:`bootstrap_test` -- paired (and by default class-stratified) bootstrap of the difference
  of a metric (AUC, AP or any callable), all replicates vectorised in numpy.

Conventions: ``y_true`` is binary (0/1 or bool, 1 = positive); a higher score means "more
positive". Arrays are per slide and *aligned*: element i of every array is the same slide. Ties
in scores count one half (midranks), as in scikit-learn's ``roc_auc_score``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple

import numpy as np
import pandas as pd
from scipy.stats import norm

MetricFn = Callable[[np.ndarray, np.ndarray], float]
PMethod = Literal["percentile", "shifted", "normal"]
_CHUNK = 1 << 22  # elements per vectorised bootstrap block (~32 MB of float64)


class DeLongResult(NamedTuple):
    auc_a: float
    auc_b: float
    diff: float  # auc_a - auc_b
    var_a: float
    var_b: float
    cov: float
    z: float
    p_value: float  # two-sided


class AUCInterval(NamedTuple):
    auc: float
    low: float
    high: float


class BootstrapResult(NamedTuple):
    stat_a: float  # metric of model a on the original slides
    stat_b: float
    diff: float  # stat_a - stat_b
    p_value: float  # two-sided, H0: diff = 0 (definition: see bootstrap_test)
    ci_low: float  # percentile CI of the difference
    ci_high: float
    n_valid: int  # replicates where both metrics were finite


# --------------------------------------------------------------------------- input checks


def _check_labels(y_true, name: str = "y_true") -> np.ndarray:
    y = np.asarray(y_true)
    if y.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one label per slide), got shape {y.shape}")
    if not np.isin(y, (0, 1)).all():
        bad = np.unique(y[~np.isin(y, (0, 1))])[:5].tolist()
        raise ValueError(f"{name} must be binary 0/1 (1 = positive class); found values {bad}")
    return y.astype(np.int8)


def _check_scores(score, n: int, name: str) -> np.ndarray:
    s = np.asarray(score, dtype=np.float64)
    if s.shape != (n,):
        raise ValueError(f"{name} has shape {s.shape} but y_true has {n} slides; pass one "
                         "score per slide (the positive-class probability), aligned with y_true")
    if not np.isfinite(s).all():
        raise ValueError(f"{name} has {int((~np.isfinite(s)).sum())} NaN/inf scores")
    return s


def _check_paired(y_true, score_a, score_b) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y = _check_labels(y_true)
    a = _check_scores(score_a, len(y), "score_a")
    b = _check_scores(score_b, len(y), "score_b")
    return y, a, b


# --------------------------------------------------------------------------- ranks, AUC, AP


def _tie_bounds(xs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First and last index of each element's tie group. xs: (..., N) sorted along -1."""
    n = xs.shape[-1]
    pos = np.broadcast_to(np.arange(n), xs.shape)  # (..., N)
    new = np.ones(xs.shape, dtype=bool)
    new[..., 1:] = xs[..., 1:] != xs[..., :-1]  # group starts
    last = np.ones(xs.shape, dtype=bool)
    last[..., :-1] = new[..., 1:]  # group ends
    start = np.maximum.accumulate(np.where(new, pos, 0), axis=-1)
    end = np.minimum.accumulate(np.where(last, pos, n)[..., ::-1], axis=-1)[..., ::-1]
    return start, end


def midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks along the last axis, ties getting their average rank.

    Args:
        x: ``(..., N)`` values.

    Returns:
        ``(..., N)`` float ranks (``scipy.stats.rankdata(method="average")`` per row).
    """
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, axis=-1, kind="stable")
    start, end = _tie_bounds(np.take_along_axis(x, order, -1))
    ranks = np.empty(x.shape)
    np.put_along_axis(ranks, order, (start + end) / 2.0 + 1.0, -1)
    return ranks


def batched_auc(y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """ROC AUC of every row (Mann-Whitney U via midranks); NaN where a row lacks a class.

    Args:
        y: ``(B, N)`` binary labels.
        s: ``(B, N)`` scores.

    Returns:
        ``(B,)`` AUCs, equal to ``sklearn.metrics.roc_auc_score`` per row.
    """
    order = np.argsort(s, axis=-1, kind="stable")
    start, end = _tie_bounds(np.take_along_axis(s, order, -1))
    ys = np.take_along_axis(y, order, -1).astype(np.float64)  # (B, N), labels in score order
    m = ys.sum(-1)  # positives per row
    n = y.shape[-1] - m
    rank_sum = (ys * ((start + end) / 2.0 + 1.0)).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (rank_sum - m * (m + 1) / 2.0) / (m * n)
    return np.where((m > 0) & (n > 0), auc, np.nan)


def batched_ap(y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Average precision of every row; NaN where a row lacks a class.

    AP = (1/P) * sum over positives of the precision at the end of the positive's tie group,
    i.e. sum_k (R_k - R_{k-1}) P_k over distinct thresholds, as in scikit-learn.

    Args:
        y: ``(B, N)`` binary labels.
        s: ``(B, N)`` scores.

    Returns:
        ``(B,)`` APs, equal to ``sklearn.metrics.average_precision_score`` per row.
    """
    order = np.argsort(-s, axis=-1, kind="stable")  # descending scores
    _, end = _tie_bounds(np.take_along_axis(-s, order, -1))
    ys = np.take_along_axis(y, order, -1).astype(np.float64)  # (B, N)
    tp = np.cumsum(ys, axis=-1)
    precision = tp / np.arange(1, y.shape[-1] + 1)  # (B, N), at each cut
    prec_at_group_end = np.take_along_axis(precision, end, -1)
    n_pos = ys.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = (ys * prec_at_group_end).sum(-1) / n_pos
    return np.where((n_pos > 0) & (n_pos < y.shape[-1]), ap, np.nan)


# --------------------------------------------------------------------------- DeLong


def _placements(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong structural components via midranks (Sun & Xu 2014).

    Returns:
        ``v10`` ``(m,)``: for each positive, the fraction of negatives it outscores (ties 1/2);
        ``v01`` ``(n,)``: for each negative, the fraction of positives that outscore it.
        Their means both equal the AUC.
    """
    pos, neg = s[y == 1], s[y == 0]
    m, n = len(pos), len(neg)
    if m < 2 or n < 2:
        raise ValueError(f"DeLong needs at least 2 positive and 2 negative slides; got {m} "
                         f"positive and {n} negative")
    tz = midranks(np.concatenate([pos, neg]))  # ranks among all slides
    v10 = (tz[:m] - midranks(pos)) / n  # negatives below each positive
    v01 = 1.0 - (tz[m:] - midranks(neg)) / m  # positives above each negative
    return v10, v01


def delong_variance(y_true, score) -> tuple[float, float]:
    """AUC and its DeLong variance, ``var = S10/m + S01/n`` (sample variances, ddof=1).

    Args:
        y_true: ``(n,)`` binary labels.
        score: ``(n,)`` scores.

    Returns:
        ``(auc, var)``.
    """
    y = _check_labels(y_true)
    v10, v01 = _placements(y, _check_scores(score, len(y), "score"))
    return float(v10.mean()), float(v10.var(ddof=1) / len(v10) + v01.var(ddof=1) / len(v01))


def delong_test(y_true, score_a, score_b) -> DeLongResult:
    """Two-sided DeLong test of H0: AUC_a = AUC_b for paired scores on the same slides.

    ``z = (auc_a - auc_b) / sqrt(var_a + var_b - 2 cov)``, ``p = 2 * (1 - Phi(|z|))``, with the
    2x2 covariance of the two AUCs estimated from the structural components,
    ``S = S10/m + S01/n`` (DeLong et al. 1988; S10, S01 sample covariances with ddof=1).
    When the difference has zero estimated variance, z = 0 and p = 1 if the AUCs are equal,
    else z = +-inf and p = 0.

    Args:
        y_true: ``(n,)`` binary labels.
        score_a: ``(n,)`` scores of model a.
        score_b: ``(n,)`` scores of model b, same slides in the same order.
    """
    y, a, b = _check_paired(y_true, score_a, score_b)
    (a10, a01), (b10, b01) = _placements(y, a), _placements(y, b)
    s10 = np.cov(np.stack([a10, b10]))  # (2, 2)
    s01 = np.cov(np.stack([a01, b01]))  # (2, 2)
    cov = s10 / len(a10) + s01 / len(a01)  # (2, 2) covariance of (auc_a, auc_b)
    auc_a, auc_b = float(a10.mean()), float(b10.mean())
    diff = auc_a - auc_b
    var_diff = cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1]
    if diff == 0.0:
        z, p = 0.0, 1.0
    elif var_diff <= 1e-12 * max(cov[0, 0] + cov[1, 1], 1e-300):  # numerically zero
        z, p = float(np.sign(diff) * np.inf), 0.0
    else:
        z = float(diff / np.sqrt(var_diff))
        p = float(2.0 * norm.sf(abs(z)))
    return DeLongResult(auc_a, auc_b, diff, float(cov[0, 0]), float(cov[1, 1]),
                        float(cov[0, 1]), z, p)


def auc_ci(y_true, score, alpha: float = 0.05,
           method: Literal["logit", "normal"] = "logit") -> AUCInterval:
    """(1 - alpha) confidence interval of one AUC from its DeLong variance.

    ``"logit"`` (default): Wald interval on logit(AUC) with the delta-method standard error
    ``sqrt(var) / (AUC (1 - AUC))``, mapped back; it stays inside (0, 1) and covers better
    than the plain interval when the AUC is near 1 (Pepe 2003, *The Statistical Evaluation of
    Medical Tests*). ``"normal"``: plain Wald interval ``AUC +- z sqrt(var)`` (the DeLong
    interval of pROC's ``ci.auc``), clipped to [0, 1]. A zero variance (e.g. AUC = 1) gives the
    degenerate interval [AUC, AUC].
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    auc, var = delong_variance(y_true, score)
    zq = norm.isf(alpha / 2.0)
    if var <= 0.0 or auc in (0.0, 1.0):
        return AUCInterval(auc, auc, auc)
    if method == "normal":
        half = zq * np.sqrt(var)
        return AUCInterval(auc, max(0.0, auc - half), min(1.0, auc + half))
    if method != "logit":
        raise ValueError(f"auc_ci method must be 'logit' or 'normal', got {method!r}")
    centre, half = np.log(auc / (1.0 - auc)), zq * np.sqrt(var) / (auc * (1.0 - auc))
    lo, hi = 1.0 / (1.0 + np.exp(-(centre - half))), 1.0 / (1.0 + np.exp(-(centre + half)))
    return AUCInterval(auc, float(lo), float(hi))


# --------------------------------------------------------------------------- bootstrap


def bootstrap_indices(y_true, n_boot: int = 2000, seed: int | None = 0,
                      stratified: bool = True) -> np.ndarray:
    """Slide indices of paired bootstrap replicates.

    Stratified: each replicate draws the positives with replacement from the positives and the
    negatives from the negatives, so every replicate keeps the original class counts (pROC's
    ``boot.stratified``). Otherwise: n draws with replacement from all slides.

    Returns:
        ``(n_boot, n)`` int indices into the slides (column order carries no meaning).
    """
    y = _check_labels(y_true)
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    rng = np.random.default_rng(seed)
    if not stratified:
        return rng.integers(0, len(y), size=(n_boot, len(y)))
    groups = [np.flatnonzero(y == c) for c in (1, 0)]
    return np.concatenate(
        [g[rng.integers(0, len(g), size=(n_boot, len(g)))] for g in groups if len(g)], axis=1)


def _batched_metric(metric: Literal["auc", "ap"] | MetricFn) -> Callable:
    """Metric as ``(y (B, N), s (B, N)) -> (B,)``."""
    if callable(metric):
        return lambda y, s: np.array([metric(yr, sr) for yr, sr in zip(y, s, strict=True)],
                                     dtype=float)
    table = {"auc": batched_auc, "ap": batched_ap}
    if metric not in table:
        raise ValueError(f"metric must be 'auc', 'ap' or a callable(y, score) -> float; "
                         f"got {metric!r}")
    return table[metric]


def _boot_p_value(d: np.ndarray, diff: float, method: PMethod) -> float:
    """Two-sided bootstrap p-value of H0: diff = 0 from replicate differences d ``(B,)``."""
    b = len(d)
    if method == "percentile":
        tail = min((d <= 0).sum(), (d >= 0).sum())
        return float(min(1.0, 2.0 * (tail + 1) / (b + 1)))
    if method == "shifted":
        return float(((np.abs(d - diff) >= abs(diff)).sum() + 1) / (b + 1))
    if method == "normal":
        sd = d.std(ddof=1) if b > 1 else 0.0
        if sd == 0.0:
            return 1.0 if diff == 0.0 else 0.0
        return float(2.0 * norm.sf(abs(diff) / sd))
    raise ValueError(f"p_method must be 'percentile', 'shifted' or 'normal', got {method!r}")


def bootstrap_test(y_true, score_a, score_b, metric: Literal["auc", "ap"] | MetricFn = "auc",
                   n_boot: int = 2000, seed: int | None = 0, stratified: bool = True,
                   alpha: float = 0.05, p_method: PMethod = "percentile") -> BootstrapResult:
    """Paired bootstrap test of H0: metric(a) = metric(b) on the same slides.

    Each replicate resamples slides with replacement (:func:`bootstrap_indices`; the same
    indices for both models) and records ``d* = metric(a*) - metric(b*)``. Replicates where
    either metric is undefined (a class missing, non-stratified only) are dropped
    (``n_valid`` counts the rest). The CI is the percentile interval
    ``[q(alpha/2), q(1 - alpha/2)]`` of d*. Two-sided p-value, ``p_method``:

    * ``"percentile"`` (default): ``p = min(1, 2 * (1 + min(#{d* <= 0}, #{d* >= 0})) / (B + 1))``,
      (up to the +1) the smallest alpha at which the percentile CI excludes 0 (test by CI
      inversion, Efron & Tibshirani 1993, *An Introduction to the Bootstrap*, ch. 16; Davison &
      Hinkley 1997, ch. 4), with the +1 correction so p is never 0 (Phipson & Smyth 2010,
      "Permutation p-values should never be zero"). Its resolution is 2 / (B + 1).
    * ``"shifted"``: the bootstrap distribution shifted to the null,
      ``p = (1 + #{|d* - d| >= |d|}) / (B + 1)`` (Efron & Tibshirani 1993, ch. 16).
    * ``"normal"``: ``z = d / sd(d*)``, ``p = 2 (1 - Phi(|z|))`` -- the bootstrap test of pROC's
      ``roc.test(method="bootstrap")`` (Robin et al. 2011, BMC Bioinformatics 12:77), whose
      defaults are also 2000 stratified replicates.

    Args:
        y_true: ``(n,)`` binary labels.
        score_a: ``(n,)`` scores of model a.
        score_b: ``(n,)`` scores of model b, same slides in the same order.
        metric: ``"auc"``, ``"ap"`` (vectorised over replicates) or ``f(y, score) -> float``
            (called once per replicate and model; slower).
        n_boot: number of replicates B.
        seed: seed of ``numpy.random.default_rng``; equal seeds give equal replicates.
        stratified: resample positives and negatives separately (keeps both classes).
        alpha: CI level is 1 - alpha.
        p_method: ``"percentile"``, ``"shifted"`` or ``"normal"`` (above).
    """
    y, a, b = _check_paired(y_true, score_a, score_b)
    fn = _batched_metric(metric)
    stat_a, stat_b = float(fn(y[None], a[None])[0]), float(fn(y[None], b[None])[0])
    idx = bootstrap_indices(y, n_boot, seed, stratified)  # (B, n)
    d = np.empty(n_boot)
    step = max(1, _CHUNK // max(len(y), 1))
    for lo in range(0, n_boot, step):
        rows = idx[lo:lo + step]  # (b, n)
        yb = y[rows]
        d[lo:lo + step] = fn(yb, a[rows]) - fn(yb, b[rows])
    d = d[np.isfinite(d)]
    if len(d) == 0:
        raise ValueError("no bootstrap replicate had a defined metric for both models (does "
                         "y_true hold both classes? try stratified=True)")
    ci_low, ci_high = np.quantile(d, [alpha / 2.0, 1.0 - alpha / 2.0])
    diff = stat_a - stat_b
    return BootstrapResult(stat_a, stat_b, diff, _boot_p_value(d, diff, p_method),
                           float(ci_low), float(ci_high), len(d))


# --------------------------------------------------------------------------- table


def _aligned(preds: dict[str, tuple], reference: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Check every model is scored on the reference's slides with the reference's labels."""
    if reference not in preds:
        raise ValueError(f"reference {reference!r} is not among the models {list(preds)}")
    y_ref = _check_labels(preds[reference][0], f"labels of {reference!r}")
    out = {}
    for name, (y, s) in preds.items():
        y = _check_labels(y, f"labels of {name!r}")
        if len(y) != len(y_ref):
            raise ValueError(f"model {name!r} has {len(y)} slides but reference {reference!r} "
                             f"has {len(y_ref)}; align the predictions on slide_id first (inner "
                             "merge of the prediction tables) so every model scores the same "
                             "slides")
        if not np.array_equal(y, y_ref):
            bad = np.flatnonzero(y != y_ref)
            raise ValueError(f"model {name!r} labels differ from reference {reference!r} at "
                             f"{len(bad)} slides (first at position {bad[0]}); the arrays are "
                             "not aligned -- sort every model's predictions by slide_id")
        out[name] = (y, _check_scores(s, len(y), f"scores of {name!r}"))
    return out


def compare_to_reference(preds: dict[str, tuple], reference: str, n_boot: int = 2000,
                         seed: int | None = 0, p_method: PMethod = "percentile") -> pd.DataFrame:
    """Each model against ``reference``: the table printed beside the paper's Table 2.

    The caller aligns the predictions: ``preds[name] = (y (n,), score (n,))`` with element i the
    same slide for every model (e.g. sorted by slide_id); lengths and labels must match the
    reference's exactly, else ``ValueError``. All models share the bootstrap replicates
    (same ``seed``).

    Returns:
        DataFrame indexed by model name (``preds`` order) with columns ``AUC``, ``AP``,
        ``p_delong`` (DeLong test of AUC), ``p_boot_auc``, ``p_boot_ap`` (paired stratified
        bootstrap, :func:`bootstrap_test`). The reference row's p-values are NaN ("Ref.").
    """
    data = _aligned(preds, reference)
    y, ref = data[reference]
    rows = []
    for name, (_, s) in data.items():
        row = {"model": name, "AUC": float(batched_auc(y[None], s[None])[0]),
               "AP": float(batched_ap(y[None], s[None])[0]),
               "p_delong": np.nan, "p_boot_auc": np.nan, "p_boot_ap": np.nan}
        if name != reference:
            row["p_delong"] = delong_test(y, s, ref).p_value
            for m in ("auc", "ap"):
                row[f"p_boot_{m}"] = bootstrap_test(y, s, ref, m, n_boot, seed,
                                                    p_method=p_method).p_value
        rows.append(row)
    return pd.DataFrame(rows).set_index("model")
