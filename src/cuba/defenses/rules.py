"""The statistics of an input-level detector's scores: thresholds fitted on clean validation scores,
the error rates those rules realise on test inputs, AUROC summaries, and whether the scores can rank
anything at all.

Why a module of their own: STRIP, SCALE-UP, the entropy detector, Cognitive Distillation and IBD-PSC
all turn per-input scores into the same kind of numbers (a rule fitted on the *validation* split,
METHOD.md section 2, then its FAR / FRR or TPR / FPR on the *test* inputs), and the same
"not applicable" checks. Kept in one place, the detectors cannot drift apart in how a quantile is
taken, which inequality is strict, or what a key of defense.json is called. This module depends on
no other part of cuba, so :mod:`.base` and every detector can import it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal, Sequence

import numpy as np
from sklearn.metrics import roc_auc_score

if TYPE_CHECKING:
    from .base import AttackRun

# the FRRs at which STRIP, the entropy detector, Cognitive Distillation and IBD-PSC report their rules
REPORTED_FRR = (0.01, 0.05)


def rate_tag(rate: float) -> str:
    """0.01 -> "1pct", 0.05 -> "5pct", 0.025 -> "2.5pct": the suffix of the defense.json keys of a rate."""
    return f"{100 * rate:g}pct"


def val_threshold(s_val: np.ndarray, fpr: float) -> float:
    """The threshold that flags (score > it) at most a share ``fpr`` of the clean validation scores:
    their empirical (1 - fpr) quantile, taken at an observed value (``method="higher"``) so that
    ties -- discrete scores such as SCALE-UP's SPC -- never push the validation FPR above ``fpr``."""
    return float(np.quantile(np.asarray(s_val, dtype=float), 1.0 - fpr, method="higher"))


def roc_summary(s_clean: np.ndarray, s_bd: np.ndarray, s_val: np.ndarray, fpr_at: float = 0.05) -> dict[str, Any]:
    """AUROC of a detector score (higher = more suspicious), backdoor vs clean *test* inputs, and the
    TPR of a threshold fitted on clean *validation* scores ``s_val`` (:func:`val_threshold` at
    ``fpr_at``), with the FPR that threshold realises on the clean test inputs beside it.

    Why not read the TPR off the test ROC (sklearn's largest threshold with FPR <= 5%, as this did
    before): that picks the threshold on the very inputs it is then scored on, which a defender
    cannot do; a threshold fixed on held-out clean data is what a deployed detector would use, and
    its realised test FPR says how well that calibration carried over.
    """
    s_clean, s_bd = np.asarray(s_clean, dtype=float), np.asarray(s_bd, dtype=float)
    labels = np.r_[np.zeros(len(s_clean)), np.ones(len(s_bd))]
    thr = val_threshold(s_val, fpr_at)
    tag = rate_tag(fpr_at)
    out = {"auroc": float(roc_auc_score(labels, np.r_[s_clean, s_bd])),
           f"tpr_at_fpr_{tag}": float((s_bd > thr).mean()), f"test_fpr_at_fpr_{tag}": float((s_clean > thr).mean()),
           f"threshold_at_fpr_{tag}": thr}
    # the harness's own operating points (issue 18): FAR (backdoor inputs let through) at FRR 1% / 5% of
    # the same validation-fitted one-sided rule, with the FRR it realises on clean test inputs
    for rate in REPORTED_FRR:
        t = val_threshold(s_val, rate)
        out[f"far_at_frr_{rate_tag(rate)}"] = float((s_bd <= t).mean())
        out[f"frr_at_frr_{rate_tag(rate)}"] = float((s_clean > t).mean())
    unresolved = [rate_tag(r) for r in REPORTED_FRR if not resolved(len(s_val), r, False)]
    if unresolved:  # as rule_table marks them: a threshold on the sample's maximum is no fitted rate
        out["unresolved_rules"] = unresolved
    return out


def constant_scores(*scores: np.ndarray) -> bool:
    """True when every score of every array is the same value: such a detector ranks nothing, so
    its AUROC is exactly 0.5 and its flags are all-or-nothing by construction, not by measurement."""
    allv = np.concatenate([np.asarray(s, dtype=float).ravel() for s in scores])
    return len(allv) > 0 and bool(np.ptp(allv) == 0)


def empirical_two_sided(s_val: np.ndarray, fpr: float) -> tuple[float, float]:
    """(lower, upper) of the two-sided rule "flag score < lower or > upper", fitted on clean
    validation scores: their empirical fpr/2 and 1 - fpr/2 quantiles, each taken at an observed
    value on the side that keeps the validation share flagged in each tail at most fpr/2."""
    s_val = np.asarray(s_val, dtype=float)
    return (float(np.quantile(s_val, fpr / 2, method="lower")), float(np.quantile(s_val, 1 - fpr / 2, method="higher")))


def one_sided_lower(s_val: np.ndarray, frr: float) -> float:
    """The rule "flag s < lower" (Cognitive Distillation's), fitted on clean validation scores: their
    empirical frr quantile at an observed value on the low side, so at most a share frr of them lie below it."""
    return float(np.quantile(np.asarray(s_val, dtype=float), frr, method="lower"))


def far_frr(e_clean: np.ndarray, e_bd: np.ndarray, lower: float, upper: float = math.inf) -> tuple[float, float]:
    """(FAR, FRR) of the rule "flag score < lower or > upper" (STRIP's entropy, any detector's score): FAR = share of backdoor inputs
    *not* flagged (accepted as clean), FRR = share of clean inputs flagged (rejected)."""
    flagged = lambda e: (np.asarray(e) < lower) | (np.asarray(e) > upper)  # noqa: E731
    return float(1.0 - flagged(e_bd).mean()), float(flagged(e_clean).mean())


def _rules_at(s_val: np.ndarray, rate: float, one_sided: Literal["lower", "upper"] | None,
              two_sided: bool) -> list[tuple[str, float, float, Any]]:
    """(key suffix, lower, upper, what defense.json records as the threshold) of each rule at FRR
    ``rate``, one-sided first. Why the recorded form differs per rule: a lower one-sided rule writes
    [lower, null], an upper one its single threshold, a two-sided one [lower, upper] -- the forms
    defense.json files of the detectors have always had, so that old and new files read alike."""
    rules: list[tuple[str, float, float, Any]] = []
    if one_sided == "lower":
        lo = one_sided_lower(s_val, rate)
        rules.append(("", lo, math.inf, [lo, None]))
    elif one_sided == "upper":
        thr = val_threshold(s_val, rate)
        rules.append(("", -math.inf, thr, thr))
    if two_sided:
        lo, hi = empirical_two_sided(s_val, rate)
        rules.append(("_two_sided", lo, hi, [lo, hi]))
    return rules


def resolved(n_val: int, rate: float, two_sided: bool) -> bool:
    """Whether ``n_val`` validation scores can place a rule at FRR ``rate`` inside the sample, i.e. not
    on its minimum or maximum. Why it matters: there, one odd clean image sets the threshold and the
    rule's FRR is not the nominal one (142 digits validation images cannot resolve a two-sided 1%
    rule). The thresholds are numpy quantiles taken at observed values (:func:`one_sided_lower`,
    :func:`empirical_two_sided`, :func:`val_threshold`): for a tail rate q (``rate``, or ``rate / 2``
    per tail of a two-sided rule) the lower one sits at sorted index floor(q (n - 1)) and the upper
    one at ceil((1 - q) (n - 1)), so both are inside the sample exactly when q (n - 1) >= 1 -- 201
    scores for a two-sided 1% rule, 101 for a one-sided one."""
    q = rate / 2 if two_sided else rate
    return math.floor(q * (n_val - 1)) >= 1


def rule_table(s_val: np.ndarray, s_clean: np.ndarray, s_bd: np.ndarray,
               one_sided: Literal["lower", "upper"] | None = None, two_sided: bool = True,
               rates: Sequence[float] = REPORTED_FRR) -> dict[str, Any]:
    """The rules of a detector fitted on clean validation scores ``s_val`` at each FRR of ``rates``,
    and what they do on the test inputs: ``far_at_frr_{tag}`` (backdoor inputs not flagged) and
    ``frr_at_frr_{tag}`` (clean inputs flagged), then ``thresholds`` keyed by tag, and
    ``unresolved_rules`` (the tags :func:`resolved` rejects) when there are any.

    ``one_sided``: "lower" flags s < the empirical frr quantile (:func:`one_sided_lower`, low =
    backdoor), "upper" flags s > the empirical 1 - frr quantile (:func:`val_threshold`, high =
    backdoor), None reports no one-sided rule; its keys carry the bare tag ("1pct"). ``two_sided``
    adds the rule of :func:`empirical_two_sided`, keys "{tag}_two_sided". Why one function: three
    detectors wrote this loop each, and a shared one keeps their keys, key order and thresholds the same.
    """
    out: dict[str, Any] = {}
    thresholds: dict[str, Any] = {}
    for rate in rates:
        tag = rate_tag(rate)
        for suffix, lo, hi, recorded in _rules_at(s_val, rate, one_sided, two_sided):
            out[f"far_at_frr_{tag}{suffix}"], out[f"frr_at_frr_{tag}{suffix}"] = far_frr(s_clean, s_bd, lo, hi)
            thresholds[tag + suffix] = recorded
    out["thresholds"] = thresholds
    unresolved = [rate_tag(rate) + suffix for rate in rates for suffix, *_ in _rules_at(s_val, rate, one_sided, two_sided)
                  if not resolved(len(s_val), rate, suffix == "_two_sided")]
    if unresolved:  # only then: files of well-calibrated runs keep their keys
        out["unresolved_rules"] = unresolved
    return out


def clean_model_reason(scored: str = "scores", imported: bool = False) -> str:
    """The "not applicable" reason of an input detector on a model without a known trigger. Why it is
    not applicable: its backdoor column (``scored``: "scores", "masks", ...) holds the probe patch of
    :meth:`~.base.AttackRun.backdoor`, a negative control and not a detection. An ``imported`` model
    (``cuba import-model``) may well hold a backdoor; only its trigger is unknown, so the reason says that."""
    if imported:
        return (f"imported model: its trigger, if any, is unknown, so there are no backdoor inputs to score (the backdoor "
                f"{scored} are of a 3x3 probe patch); apply the detector to the inputs the model receives")
    return (f"clean model: no trigger to detect (the backdoor {scored} are of a 3x3 probe patch it never learned, "
            "kept as a negative control)")


def score_inapplicable_reason(run: AttackRun, what: str, s_val: np.ndarray, s_clean: np.ndarray, s_bd: np.ndarray,
                              *, unit: str = "", rules: str = "the thresholds", scored: str = "scores") -> str | None:
    """Why a validation-calibrated input detector's numbers measure nothing on ``run`` (None when they
    do): a clean model (:func:`clean_model_reason`); clean validation scores that are all equal (the
    quantile thresholds coincide and a rank score is a step); or test scores that are all equal
    (the score ranks nothing). ``what`` names the score ("entropy", "mask norm") and ``unit`` follows
    the value (" bits"); ``rules`` names the thresholds that coincide. Why shared: each detector
    wrote these checks in the same order, and the reasons end up side by side in one table."""
    if run.trigger is None:
        return clean_model_reason(scored, run.imported)
    if constant_scores(s_val):
        return (f"every clean validation image has the same {what} ({float(s_val[0]):.4g}{unit}): "
                f"{rules} coincide and the rank score is a step")
    if constant_scores(s_clean, s_bd):
        return f"every test input has the same {what}: the score ranks nothing"
    return None


def split_sizes(n_avail: int, n_fit: int, n_measure: int) -> tuple[int, int]:
    """(fit, measure) counts from ``n_avail`` clean validation images, for a detector that must fit one
    thing and measure or calibrate on others (disjoint, so nothing is judged on the images it was
    fitted to): as asked when there are enough, otherwise the available images split in the same
    proportion (at least one each when n_avail >= 2)."""
    if n_avail >= n_fit + n_measure:
        return n_fit, n_measure
    fit = min(max(1, round(n_avail * n_fit / (n_fit + n_measure))), n_avail - 1)
    return fit, n_avail - fit
