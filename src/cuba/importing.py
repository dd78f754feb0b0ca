"""``cuba import-model``: turn a classifier someone else trained into a run folder the defenses can audit.

Downloaded weights are the threat this toolkit studies, so loading them is strict:

* ``.safetensors`` files are plain tensors and load directly;
* pickle-based ``.pt`` / ``.pth`` / ``.bin`` files are refused unless the user passes
  ``allow_pickle`` (``--allow-pickle``), and even then are read with
  ``torch.load(weights_only=True)``, whose unpickler only rebuilds tensors and plain containers:
  a crafted file that tries to run code fails to load instead (a test proves it).

The state dict may be a whole :class:`cuba.models.Classifier` (keys ``normalize.*`` and
``backbone.*``) or a bare backbone (its keys as the architecture names them); a bare backbone
gets a ``Normalize`` layer from ``mean``/``std`` (the statistics its owner trained with).
"""

from __future__ import annotations

import pickle
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from .config import ConfigError, make_config
from .data import DataError
from .formatting import first_line
from .models import build_classifier

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".ckpt")


def read_state_dict(path: str | Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of a weights file; pickle formats only with ``allow_pickle``, and then weights-only."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"weights file not found: {p}")
    if p.suffix == ".safetensors":
        try:
            return load_file(str(p))
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise DataError(f"{p} is not a readable safetensors file: {first_line(e)}") from None
    if p.suffix not in PICKLE_SUFFIXES:
        raise DataError(f"{p}: unknown weights format; expected .safetensors or a pickle file ({', '.join(PICKLE_SUFFIXES)})")
    if not allow_pickle:
        raise ConfigError(f"{p} is a pickle file, which can run code when loaded; convert it to safetensors, "
                          "or pass --allow-pickle to read it with torch.load(weights_only=True)")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
        raise DataError(f"{p} was refused by the weights-only unpickler (it holds more than tensors, "
                        f"or is corrupt): {first_line(e)}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # the common {"state_dict": ..., "epoch": ...} wrapper
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DataError(f"{p} does not hold a state dict of tensors")
    return obj


def import_model(
    weights: str | Path, out: str | Path, model: str, dataset: str, data_dir: str | None = None,
    allow_pickle: bool = False, mean: list[float] | None = None, std: list[float] | None = None,
) -> Path:
    """Write a run folder (config, safetensors weights, status, metrics of the clean model) for foreign weights."""
    from .data import data_for
    from .pipeline import evaluate_run
    from .runs import save_config, save_weights, write_json

    if Path(out).exists() and (not Path(out).is_dir() or any(Path(out).iterdir())):
        # never over a trained run (its config, metrics and predictions would be replaced, its
        # generator and targets left behind), nor over anything else the user keeps there
        raise ConfigError(f"--out {out} exists and is not an empty folder; give a new folder for the imported model")
    cfg = make_config({"dataset": dataset, "data_dir": data_dir, "model": model, "attack": "none", "out": str(out), "progress": False})
    state = read_state_dict(weights, allow_pickle)
    data = data_for(cfg)
    c = data.channels
    clf = build_classifier(model, c, data.num_classes, data.image_size,
                           torch.tensor(mean or [0.0] * c), torch.tensor(std or [1.0] * c))
    target: Any = clf if any(k.startswith("backbone.") for k in state) else clf.backbone
    expected = set(target.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:  # a summary: torch's own message lists every key, thousands of characters
        def some(keys: list[str]) -> str:
            return ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")

        parts = [f"{len(missing)} missing key(s) ({some(missing)})" if missing else "",
                 f"{len(unexpected)} unexpected key(s) ({some(unexpected)})" if unexpected else ""]
        raise DataError(f"{weights} does not fit {model} on {data.name}: {'; '.join(p for p in parts if p)} "
                        "-- another architecture (--model)?")
    try:
        target.load_state_dict(state)
    except RuntimeError as e:  # same keys, other shapes (another number of classes or channels)
        raise DataError(f"{weights} does not fit {model} on {data.name}: {first_line(e)[:300]}") from None
    run_dir = Path(out)
    save_config(run_dir, cfg)
    save_weights(run_dir / "classifier.safetensors", clf)
    write_json(run_dir / "status.json", {"state": "finished", "imported_from": str(weights), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
    evaluate_run(run_dir, write=True)  # predictions.npz and metrics.json (CA) of the imported model
    return run_dir
