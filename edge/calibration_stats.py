"""ROC statistics for threshold calibration, with bootstrap intervals (numpy only).

Scores and confirmatory results of n people. The AUC is the Mann-Whitney statistic (ties
count one half). Operating points at a threshold t refer everyone with score >= t, as the
appliance does. Intervals are 95% percentile intervals of a bootstrap that resamples people
(not stratified: the referral rate depends on the prevalence, so the prevalence varies as in
a new sample of the same population); replicates without a positive or without a negative
are left out. The resampling seed comes from the data, so the same file gives the same report.

Threshold rules, each choosing a threshold midway between the lowest score the rule must
refer and the next lower score seen (the same empirical operating point, with a margin on
both sides):
- ``target_sensitivity``: the highest threshold with sensitivity >= the target;
- ``max_referral_rate``: the lowest threshold that refers at most that share of people.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from engines.train.metrics import roc_auc   # one AUC for the training run, model_eval and calibration

RULES = ("target_sensitivity", "max_referral_rate")
WHO_SENSITIVITY, WHO_SPECIFICITY = 0.90, 0.70     # WHO target product profile for TB CAD
MIN_PER_CLASS = 10        # fewer positives or negatives: no meaningful interval
BOOTSTRAP_REPLICATES = 2000
TABLE_THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 20))
_CHUNK = 250              # replicates at a time (memory: chunk x distinct scores)
METRICS = ("sensitivity", "specificity", "referral_rate", "tests_per_case")


def auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the empirical ROC curve (Mann-Whitney U / (P N), ties count 1/2)."""
    scores, positive = np.asarray(scores, float), np.asarray(positive, bool)
    return roc_auc(scores[positive], scores[~positive])


def operating_point(scores: np.ndarray, positive: np.ndarray, threshold: float) -> dict[str, Any]:
    """Counts and rates when everyone with score >= ``threshold`` is referred."""
    scores, positive = np.asarray(scores, float), np.asarray(positive, bool)
    referred = scores >= threshold
    tp, fp = int((referred & positive).sum()), int((referred & ~positive).sum())
    p, n = int(positive.sum()), int((~positive).sum())
    return {"referred": tp + fp, "true_positives": tp, "false_positives": fp,
            "sensitivity": tp / p, "specificity": (n - fp) / n,
            "referral_rate": (tp + fp) / (p + n),
            "tests_per_case": (tp + fp) / tp if tp else math.inf}


def choose_threshold(scores: np.ndarray, positive: np.ndarray, rule: str, value: float) -> float:
    """The threshold ``rule`` implies (see the module docstring); ValueError if none does."""
    scores, positive = np.asarray(scores, float), np.asarray(positive, bool)
    distinct = np.unique(scores)                       # ascending
    if rule == "target_sensitivity":
        if not 0.0 < value <= 1.0:
            raise ValueError(f"target sensitivity: expected a fraction in (0, 1], got {value}")
        pos = np.sort(scores[positive])[::-1]
        k = max(1, math.ceil(value * len(pos) - 1e-9))
        lowest_referred = pos[k - 1]
    elif rule == "max_referral_rate":
        if not 0.0 < value <= 1.0:
            raise ValueError(f"maximum referral rate: expected a fraction in (0, 1], got {value}")
        allowed = math.floor(value * len(scores) + 1e-9)
        ranked = np.sort(scores)[::-1]
        if allowed >= len(scores):
            lowest_referred = ranked[-1]
        else:
            above = distinct[distinct > ranked[allowed]]
            if not len(above):
                raise ValueError(f"no threshold refers at most {value:.0%} of these people: "
                                 f"the {allowed + 1} highest scores are equal")
            lowest_referred = above[0]
    else:
        raise ValueError(f"rule: {rule!r} is not one of {', '.join(RULES)}")
    below = distinct[distinct < lowest_referred]
    if not len(below):
        return float(lowest_referred)
    middle = (float(lowest_referred) + float(below[-1])) / 2.0
    rounded = round(middle, 6)
    return rounded if below[-1] < rounded <= lowest_referred else middle


def _interval(values: np.ndarray, *, unbounded: bool = False) -> tuple[float, float]:
    values = values[~np.isnan(values)]
    if unbounded:   # tests per case found is infinite where nobody positive was found
        lo, hi = np.percentile(values, [2.5, 97.5], method="inverted_cdf")
    else:
        lo, hi = np.percentile(values, [2.5, 97.5])
    return float(lo), float(hi)


def bootstrap(scores: np.ndarray, positive: np.ndarray, thresholds: list[float], *,
              replicates: int = BOOTSTRAP_REPLICATES, seed: int = 0) -> dict[str, Any]:
    """Percentile intervals of the AUC and, at each threshold, of every operating metric."""
    scores, positive = np.asarray(scores, float), np.asarray(positive, bool)
    n = len(scores)
    distinct, inverse = np.unique(scores, return_inverse=True)
    order = np.argsort(inverse, kind="mergesort")
    starts = np.searchsorted(inverse[order], np.arange(len(distinct)))
    at = np.searchsorted(distinct, np.asarray(thresholds, float), side="left")  # first index >= t
    rng = np.random.default_rng(seed)
    aucs, per = [], {m: [] for m in METRICS}
    done = 0
    while done < replicates:
        b = min(_CHUNK, replicates - done)
        weights = rng.multinomial(n, np.full(n, 1.0 / n), size=b).astype(np.float64)[:, order]
        w_pos = np.add.reduceat(weights * positive[order], starts, axis=1)    # b x distinct
        w_neg = np.add.reduceat(weights * ~positive[order], starts, axis=1)
        p, q = w_pos.sum(1), w_neg.sum(1)
        ok = (p > 0) & (q > 0)
        neg_below = np.cumsum(w_neg, 1) - w_neg
        with np.errstate(invalid="ignore", divide="ignore"):
            aucs.append(np.where(ok, (w_pos * (neg_below + 0.5 * w_neg)).sum(1) / (p * q), np.nan))
            zeros = np.zeros((b, 1))
            tp = np.concatenate([np.cumsum(w_pos[:, ::-1], 1)[:, ::-1], zeros], 1)[:, at]   # b x thresholds
            fp = np.concatenate([np.cumsum(w_neg[:, ::-1], 1)[:, ::-1], zeros], 1)[:, at]
            okc = ok[:, None]
            per["sensitivity"].append(np.where(okc, tp / p[:, None], np.nan))
            per["specificity"].append(np.where(okc, 1.0 - fp / q[:, None], np.nan))
            per["referral_rate"].append(np.where(okc, (tp + fp) / n, np.nan))
            per["tests_per_case"].append(np.where(okc, np.where(tp > 0, (tp + fp) / np.maximum(tp, 1e-300),
                                                                  np.inf), np.nan))
        done += b
    all_auc = np.concatenate(aucs)
    out: dict[str, Any] = {"replicates": replicates, "used": int((~np.isnan(all_auc)).sum()),
                           "auc": _interval(all_auc), "at": []}
    stacked = {m: np.concatenate(v, 0) for m, v in per.items()}
    for k in range(len(thresholds)):
        out["at"].append({m: _interval(stacked[m][:, k], unbounded=(m == "tests_per_case"))
                          for m in METRICS})
    return out


def roc_points(scores: np.ndarray, positive: np.ndarray) -> list[tuple[float, float, float]]:
    """(threshold, 1 - specificity, sensitivity) at every distinct score, highest first,
    starting at (inf, 0, 0)."""
    scores, positive = np.asarray(scores, float), np.asarray(positive, bool)
    p, n = positive.sum(), (~positive).sum()
    out = [(math.inf, 0.0, 0.0)]
    for t in np.unique(scores)[::-1]:
        referred = scores >= t
        out.append((float(t), float((referred & ~positive).sum() / n), float((referred & positive).sum() / p)))
    return out


def who_range(points: list[tuple[float, float, float]]) -> tuple[float, float] | None:
    """The lowest and highest threshold seen that meet the WHO target (sensitivity >= 90%
    with specificity >= 70%), or None when none does."""
    ok = [t for t, fpr, tpr in points if math.isfinite(t) and tpr >= WHO_SENSITIVITY
          and 1.0 - fpr >= WHO_SPECIFICITY]
    return (min(ok), max(ok)) if ok else None
