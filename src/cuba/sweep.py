"""``cuba sweep``: train one config field over several values and seeds, then tabulate and plot.

Every cell (value x seed) is its own run folder ``OUT/FIELD=VALUE-sSEED``; a cell whose folder
already holds metrics.json is skipped, so an interrupted sweep continues where it stopped.
All cells are validated before the first one trains, so a typo fails in a second, not after an
hour. The summary is :func:`cuba.compare.compare` grouped by the swept field:
``OUT/sweep-FIELD.{md,csv,png}``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import yaml

from .config import FIELDS, ConfigError, TrainConfig, make_config


def parse_value(raw: str) -> Any:
    """A sweep value as YAML reads it: '0.1' -> 0.1, '5' -> 5, 'residual' -> 'residual'."""
    return yaml.safe_load(raw)


def plan_cells(base: dict[str, Any], field: str, values: list[Any], seeds: list[int], out: Path) -> list[TrainConfig]:
    """One validated config per (value, seed), each with its own ``out`` folder."""
    if field not in FIELDS:
        raise ConfigError(f"sweep: unknown config field {field!r}")
    if field == "seed":
        raise ConfigError("sweep: seeds are given with --seeds, not swept as a field")
    if not values or not seeds:
        raise ConfigError("sweep: needs at least one value and one seed")
    cells = []
    for v in values:
        for s in seeds:
            cells.append(make_config({**base, field: v, "seed": s, "out": str(out / f"{field}={v}-s{s}")}))
    return cells


def run_sweep(
    base: dict[str, Any], field: str, values: list[Any], seeds: list[int], out: Path,
    runner: Callable[[TrainConfig], Any] | None = None, log: Callable[[str], None] = print,
) -> tuple[str, list[Path]]:
    """Train every missing cell, then write the grouped table and plot; return (markdown, files)."""
    from .compare import compare

    if runner is None:
        from .pipeline import run_training as runner
    cells = plan_cells(base, field, values, seeds, out)
    for i, cfg in enumerate(cells, 1):
        done = (Path(cfg.out) / "metrics.json").is_file()
        log(f"[{i}/{len(cells)}] {field}={getattr(cfg, field)} seed {cfg.seed}: {'done, skipped' if done else 'training'}")
        if not done:
            runner(cfg)
    return compare([c.out for c in cells], out=out, name=f"sweep-{field}", by=field)
