"""cuba models and data in IBM's Adversarial Robustness Toolbox (ART), an optional extra.

Why: ART ships defenses cuba does not (Activation Clustering, Spectral Signatures) and its own
STRIP; running them on cuba runs -- and scoring them against what cuba knows, the poison mask of
a poisoning baseline and the trigger -- lets a user compare toolkits on the same model and data.
ART is never required: it is imported inside the functions (``pip install -e '.[art]'``).

This module runs ART's defenses and scores them; what they are handed (the wrapped model, the
rebuilt training set) is built in :mod:`cuba.interop.art_inputs`, whose names are re-exported here.

* :func:`to_art` -- a run (folder, pack or :class:`~cuba.defenses.AttackRun`) or a bare
  ``nn.Module`` as ART's ``PyTorchClassifier``, in one call (:mod:`cuba.interop.art_inputs` says
  which layer ART's AC and SS read).
* :func:`poisoned_training_set` -- the training set a BadNets / UBW-P run was trained on, rebuilt
  exactly, with the poison mask as ground truth.
* :func:`art_activation_clustering`, :func:`art_spectral_signatures` -- ART's detectors on that
  set; precision / recall (TPR) / FPR / F1 of the flagged images against the mask.
* :func:`art_strip` -- ART's STRIP on the inputs ``cuba defend strip`` scores. ART's score is
  ``sum(scipy.stats.entropy(P, base=2, axis=0)) / N`` over the (N, K) predictions P of N alpha-0.5
  blends: per class, the entropy of how that class's probability spreads over the N overlays,
  not the per-prediction entropy of the STRIP paper. On N identical predictions every column is
  flat, so the score is *maximal* (K log2 N / N), and on exact one-hot rows the all-zero columns
  give 0/0 = NaN; ART's rule (flag score <= threshold) then never flags such an input, and a
  NaN among the calibration scores makes ``mitigate`` raise. The measured consequences are in
  benchmarks/results/art_interop.md; trust ``cuba defend strip`` for STRIP numbers.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from sklearn.metrics import roc_auc_score

from ..defenses.base import AttackRun
from ..defenses.strip import far_frr, normal_thresholds
from .art_inputs import INSTALL_HINT, PoisonedTrainingSet, _as_run, _require_art, poisoned_training_set, to_art

__all__ = ["INSTALL_HINT", "PoisonedTrainingSet", "art_activation_clustering", "art_spectral_signatures", "art_strip",
           "detection_metrics", "poisoned_training_set", "to_art"]


def detection_metrics(flagged: np.ndarray, poisoned: np.ndarray) -> dict[str, Any]:
    """How well a set of flagged training images matches the poison mask: counts, precision,
    recall (= TPR), FPR and F1. A rate whose denominator is 0 is None (undefined, not 0)."""
    f, p = np.asarray(flagged, dtype=bool), np.asarray(poisoned, dtype=bool)
    tp, fp = int((f & p).sum()), int((f & ~p).sum())
    fn, tn = int((~f & p).sum()), int((~f & ~p).sum())
    div = lambda a, b: a / b if b else None  # noqa: E731
    recall = div(tp, tp + fn)
    return {"n": len(f), "n_poison": int(p.sum()), "n_flagged": int(f.sum()), "tp": tp, "fp": fp, "fn": fn, "tn": tn,
            "precision": div(tp, tp + fp), "recall": recall, "tpr": recall, "fpr": div(fp, fp + tn),
            "f1": div(2 * tp, 2 * tp + fp + fn)}


@contextmanager
def _numpy_seed(seed: int) -> Iterator[None]:
    """ART's KMeans, PCA and STRIP overlay draws use NumPy's global generator; seed it for
    repeatable numbers and give the caller's state back afterwards."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def _poison_report(name: str, ts: PoisonedTrainingSet, is_clean: Any, k: int, params: dict, t0: float) -> dict[str, Any]:
    """The fields of a poison detector's result: metrics against the mask, and per class (by
    training label) how many images were flagged and how many were poisoned."""
    flagged = np.asarray(is_clean) == 0
    return {"defense": name, "params": params, "applicable": True, **detection_metrics(flagged, ts.poisoned),
            "flagged_per_class": np.bincount(ts.y[flagged], minlength=k).tolist(),
            "poison_per_class": np.bincount(ts.y[ts.poisoned], minlength=k).tolist(),
            "flagged": flagged, "seconds": round(time.perf_counter() - t0, 2)}


def art_activation_clustering(run: AttackRun | str | Path, training_set: PoisonedTrainingSet | None = None, *,
                              cluster_analysis: str = "smaller", nb_clusters: int = 2, nb_dims: int = 10,
                              reduce: str = "PCA", features: str = "penultimate", seed: int = 0) -> dict[str, Any]:
    """ART's Activation Clustering (Chen et al. 2018) on a poisoning run's training set.

    Per training label: the penultimate activations, reduced (PCA to ``nb_dims``), split in
    ``nb_clusters`` by KMeans; ``cluster_analysis`` says which cluster is poison -- ART's default
    ``"smaller"`` flags the smaller cluster of *every* class, ``"relative-size"`` only a cluster
    under 35% of its class (the paper's size rule). ``features``: what ART reads (:func:`to_art`).
    Returns :func:`detection_metrics` fields, or ``applicable: false`` with ART's error.
    """
    _require_art()
    from art.defences.detector.poison import ActivationDefence

    run = _as_run(run)
    ts = training_set if training_set is not None else poisoned_training_set(run)
    params = {"cluster_analysis": cluster_analysis, "nb_clusters": nb_clusters, "nb_dims": nb_dims,
              "reduce": reduce, "features": features, "seed": seed}
    t0 = time.perf_counter()
    with _numpy_seed(seed):
        defence = ActivationDefence(to_art(run, features=features), ts.x, ts.y)
        try:
            _, is_clean = defence.detect_poison(**{k: v for k, v in params.items() if k not in ("seed", "features")})
        except ValueError as err:  # ART 1.20's relative-size analysis under NumPy 2 (see docs/interop-art.md)
            return {"defense": "art-activation-clustering", "params": params, "applicable": False,
                    "reason": f"ART's {cluster_analysis!r} cluster analysis failed: {err}"}
    return _poison_report("art-activation-clustering", ts, is_clean, run.num_classes, params, t0)


def art_spectral_signatures(run: AttackRun | str | Path, training_set: PoisonedTrainingSet | None = None, *,
                            expected_pp_poison: float = 0.33, eps_multiplier: float = 1.5,
                            features: str = "penultimate", seed: int = 0) -> dict[str, Any]:
    """ART's Spectral Signatures (Tran et al. 2018) on a poisoning run's training set.

    Per training label: each image's score is the |projection| of its penultimate activations on
    the top right-singular vector of the centred activations (ART projects the uncentred vectors,
    the paper the centred ones); the top ``eps_multiplier * expected_pp_poison`` share of
    *every* class is flagged (ART's defaults flag 49.5% of each class). Passing the run's true
    poison share is an oracle a defender lacks; say so when reporting it. ``features``: what ART
    reads (:func:`to_art`).
    """
    _require_art()
    from art.defences.detector.poison import SpectralSignatureDefense

    run = _as_run(run)
    ts = training_set if training_set is not None else poisoned_training_set(run)
    params = {"expected_pp_poison": expected_pp_poison, "eps_multiplier": eps_multiplier, "features": features,
              "seed": seed}
    t0 = time.perf_counter()
    with _numpy_seed(seed):
        defence = SpectralSignatureDefense(to_art(run, features=features), ts.x, ts.y,
                                           expected_pp_poison=expected_pp_poison, eps_multiplier=eps_multiplier)
        _, is_clean = defence.detect_poison()
    return _poison_report("art-spectral-signatures", ts, is_clean, run.num_classes, params, t0)


@contextmanager
def _recorded_strip_scores(num_samples: int) -> Iterator[dict[str, list[float]]]:
    """The score ART's STRIP computes for each input, as it computes it, beside the STRIP paper's
    score of the very same predictions. ART's module-level ``entropy`` is wrapped for the duration;
    each call's (N, K) predictions P and result r give ``art``: ``sum(r) / num_samples`` (ART's
    own expression, NaN included; ART keeps no scores) and ``paper``: the mean over the N blends
    of each prediction's base-2 entropy. Same blends, same draws: only the formula differs."""
    from art.estimators.poison_mitigation.strip import strip as art_strip_module

    original, seen = art_strip_module.entropy, {"art": [], "paper": []}

    def recording(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        seen["art"].append(float(np.sum(out)) / float(num_samples))
        seen["paper"].append(float(np.mean(original(np.asarray(args[0], dtype=float), base=2, axis=1))))
        return out

    art_strip_module.entropy = recording
    try:
        yield seen
    finally:
        art_strip_module.entropy = original


def _take(seen: dict[str, list[float]]) -> tuple[np.ndarray, np.ndarray]:
    """(ART's scores, the paper's scores) recorded so far; the record starts again empty."""
    out = np.array(seen["art"], dtype=float), np.array(seen["paper"], dtype=float)
    seen["art"].clear()
    seen["paper"].clear()
    return out


def _strip_auroc(s_clean: np.ndarray, s_bd: np.ndarray) -> float | None:
    """AUROC of a STRIP rule (a low score is suspicious); a NaN score ranks as the least
    suspicious, as ART's ``score <= threshold`` never flags it (NaN compares false)."""
    s = np.r_[s_clean, s_bd]
    if not len(s_clean) or not len(s_bd):
        return None
    finite = s[np.isfinite(s)]
    s = np.where(np.isnan(s), (finite.max() + 1.0) if len(finite) else 0.0, s)
    labels = np.r_[np.zeros(len(s_clean)), np.ones(len(s_bd))]
    return float(roc_auc_score(labels, -s))


def _paper_formula(paper: dict[str, np.ndarray], frr: float) -> dict[str, Any]:
    """The STRIP paper's score on ART's own blends and draws, under ART's rule (a normal fitted to
    the calibration scores, flag below its ``frr`` quantile): what ART would report with the
    paper's formula, so the formula's share of any difference can be read off."""
    if len(paper["calib"]) < 2 or not np.isfinite(paper["calib"]).all():
        return {"paper_formula_auroc": None, "paper_formula_far": None, "paper_formula_frr": None}
    lower, _ = normal_thresholds(paper["calib"], frr, two_sided=False)
    far, frr_test = far_frr(paper["clean"], paper["backdoor"], lower)
    return {"paper_formula_auroc": _strip_auroc(paper["clean"], paper["backdoor"]), "paper_formula_far": far,
            "paper_formula_frr": frr_test, "paper_formula_entropy_clean": paper["clean"].tolist(),
            "paper_formula_entropy_backdoor": paper["backdoor"].tolist()}


def _strip_fields(clf: Any, e: dict[str, np.ndarray], flags: dict[str, np.ndarray], reason: str | None) -> dict[str, Any]:
    """ART STRIP's result: FAR (backdoor inputs not flagged) / FRR (clean inputs flagged) of its
    own threshold, AUROC of its score, NaN counts, the per-input scores and flags."""
    fc, fb = flags["clean"], flags["backdoor"]
    finite = e["calib"][np.isfinite(e["calib"])]
    ok = reason is None
    return {
        "applicable": ok, **({"reason": reason} if reason else {}),
        "auroc": _strip_auroc(e["clean"], e["backdoor"]) if ok else None,
        "far": float(1.0 - fb.mean()) if ok else None, "frr": float(fc.mean()) if ok else None,
        "threshold": None if clf.entropy_threshold is None else float(clf.entropy_threshold),
        "calib_mean": float(finite.mean()) if len(finite) else None,
        "calib_std": float(finite.std(ddof=1)) if len(finite) > 1 else None,
        **{f"nan_{k}": int(np.isnan(v).sum()) for k, v in e.items()}, **{f"n_{k}": len(v) for k, v in e.items()},
        "entropy_clean": e["clean"].tolist(), "entropy_backdoor": e["backdoor"].tolist(),
        "flags_clean": fc.tolist(), "flags_backdoor": fb.tolist(),
    }


def _strip_inputs(run: AttackRun, n_eval: int, n_calib: int, seed: int) -> dict[str, np.ndarray]:
    """The inputs ``cuba defend strip`` uses (calibration, clean test, backdoor test) as float32 arrays."""
    calib, _ = run.clean_val(n_calib, seed=seed)
    x, _ = run.attacked_test(n_eval, seed=seed)
    arrays = {"calib": calib, "clean": x, "backdoor": run.backdoor(x)}
    return {k: v.float().cpu().numpy().astype(np.float32) for k, v in arrays.items()}


def art_strip(run: AttackRun | str | Path, *, num_samples: int = 20, frr: float = 0.01, n_eval: int = 1000,
              n_calib: int = 1000, seed: int = 0) -> dict[str, Any]:
    """ART's STRIP on the inputs ``cuba defend strip`` scores: the same clean test images of
    attacked classes (:meth:`AttackRun.attacked_test`, ``n_eval``, ``seed``), their backdoor twins,
    and the same clean validation images (:meth:`AttackRun.clean_val`), which ART uses both to fit
    its threshold and as its overlay pool. ART's ``false_acceptance_rate`` is set to ``frr``: it is
    the quantile of the clean scores below which ART flags, i.e. a target FRR, not a FAR.

    Returns FAR/FRR of ART's own flags (abstentions), its scores, and the ``paper_formula_*``
    fields (:func:`_paper_formula`); ``applicable`` is false, with the reason, when ART cannot
    calibrate (its ``mitigate`` raises on NaN calibration scores).
    """
    _require_art()
    from art.defences.transformer.poisoning import STRIP

    run = _as_run(run)
    arrays = _strip_inputs(run, n_eval, n_calib, seed)
    clf = STRIP(to_art(run, probabilities=True))(num_samples=num_samples, false_acceptance_rate=frr)
    t0, reason, e, paper, flags = time.perf_counter(), None, {}, {}, {}
    with _numpy_seed(seed), _recorded_strip_scores(num_samples) as seen:
        try:
            clf.mitigate(arrays["calib"])
        except ValueError as err:  # scipy's norm.fit refuses non-finite data
            reason = f"ART's mitigate failed on the clean calibration scores ({err})"
        e["calib"], paper["calib"] = _take(seen)
        for k in ("clean", "backdoor"):
            flags[k] = ~np.asarray(clf.predict(arrays[k])).any(1) if reason is None else np.zeros(len(arrays[k]), bool)
            e[k], paper[k] = _take(seen) if reason is None else (np.full(len(arrays[k]), np.nan),) * 2
    out = _strip_fields(clf, e, flags, reason)
    out.update(_paper_formula(paper, frr), defense="art-strip", seconds=round(time.perf_counter() - t0, 2),
               params={"num_samples": num_samples, "frr": frr, "n_eval": n_eval, "n_calib": n_calib, "seed": seed,
                       "blend": "alpha 0.5 (ART)", "overlays": "the calibration images (ART)"})
    return out
