"""How a removal defense's numbers read (Fine-pruning, NAD): which ASR is the headline of a run and
how a curve's first and last rows are written. Under an untargeted rule a repaired model's clean
mistakes count as successes, so ASR-C is the headline there (METHOD.md section 2); the all-to-one
controls keep plain ASR. :mod:`cuba.defenses.base` re-exports these names."""

from __future__ import annotations

from typing import Any

from ..attack.registry import ALL_TO_ONE
from ..config import TrainConfig
from ..formatting import pct as _pct
from ..metrics import at_chance


def pct(v: float | None) -> str:
    """A rate in [0, 1] as a percentage with one decimal (defense tables); "–" where undefined."""
    return _pct(v, 1)


ASR_NAMES = {"asr": "ASR", "asr_c": "ASR-C"}


def headline_asr_key(cfg: TrainConfig) -> str:
    """"asr_c" for untargeted attacks (every FRA/NRA attack and UBW-P: all attacks but the all-to-one
    controls), "asr" for the targeted controls (targeted, badnets) and clean models.

    Under an untargeted rule a repaired model's clean mistakes count as successes, so its ASR
    stays near 1 - CA whether or not the backdoor survives (METHOD.md section 2); under an
    all-to-one rule a clean mistake lands on the target class only by chance, so plain ASR is
    the paper's number there."""
    return "asr_c" if cfg.is_attack and cfg.attack not in ALL_TO_ONE else "asr"


def headline_asr_key_of(fields: dict[str, Any]) -> str:
    """The headline ASR key of a mitigation defense.json: its ``asr_headline_key``, or for one written
    before that field, inferred from its ``setting`` label (clean / targeted-tN / badnets-tN: ASR;
    any other attack: ASR-C)."""
    if fields.get("asr_headline_key"):
        return str(fields["asr_headline_key"])
    setting = str(fields.get("setting", "clean"))
    return "asr" if setting == "clean" or setting.startswith(tuple(f"{a}-t" for a in ALL_TO_ONE)) else "asr_c"


def headline_value(row: dict[str, Any], key: str, suffix: str = "") -> tuple[float | None, str]:
    """(value, label) of a removal row's headline ASR: ``row[key + suffix]``, or -- for a row written
    before ASR-C was recorded -- plain ASR labelled "ASR (ASR-C not recorded)", so the fallback is
    never mistaken for ASR-C."""
    if key + suffix in row:
        return row[key + suffix], ASR_NAMES[key]
    return row.get("asr" + suffix), "ASR (ASR-C not recorded)" if key == "asr_c" else "ASR"


def removal_headline(rows: list[dict[str, Any]], key: str, num_classes: int | None = None, asr_key: str = "asr") -> str:
    """First and last row of a mitigation curve (Fine-pruning, NAD) as CA/ASR or CA/ASR-C in %.

    ``asr_key`` picks the headline ASR (:func:`headline_asr_key`); the label says which one was
    printed. With ``num_classes``, a last model whose CA is under twice chance is said to be so:
    its ASR then counts where a model that no longer classifies happens to point, not a backdoor.
    """
    first, last = rows[0], rows[-1]
    a0, label = headline_value(first, asr_key)
    a1, _ = headline_value(last, asr_key)
    text = f"{key} {first[key]:g}: {pct(first['ca'])}/{pct(a0)} → {last[key]:g}: {pct(last['ca'])}/{pct(a1)} (CA/{label})"
    if last["asr"] is not None and at_chance(last["ca"], num_classes):
        text += f" — CA at chance level (K={num_classes}): ASR not meaningful"
    return text
