"""Running a grid's cells: one after another in this process, in parallel local processes, or on
SLURM -- the last two through submitit, so the same function runs everywhere.

A cell is *done* when its run folder says ``finished`` (status.json) and each of its defenses
has a defense.json; done cells are skipped, so re-running ``cuba reproduce`` after an
interruption continues where it stopped (an interrupted training also resumes from its
checkpoint). Before anything runs, every existing cell folder is checked to hold the cell's
setting: a grid edited after a run, or a run folder copied in by hand, is never reused silently.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any, Callable

from tqdm.auto import tqdm

from ..checkpoint import CHECKPOINT
from ..runs import RunFolder, is_finished
from .grid import Cell


def cell_dir(out: Path, cell: Cell) -> Path:
    return Path(out) / "runs" / cell.name


def is_done(out: Path, cell: Cell) -> bool:
    return cell_state(out, cell) == "done"


def cell_state(out: Path, cell: Cell) -> str:
    """'done', 'to run' (with a note when a checkpoint is there), 'trained; defenses to run: ...'
    (what a re-run would still do), or 'blocked: <why>' when what is left needs a data set that
    has no local copy here (a re-run skips it)."""
    d = cell_dir(out, cell)
    if not is_finished(d):
        # an interrupted training (a spent time budget, a kill) continues from its checkpoint
        state = "to run (resumes from its checkpoint)" if (d / CHECKPOINT).is_file() else "to run"
    else:
        missing = [n for n in cell.defenses if not (d / "defenses" / n / "defense.json").is_file()]
        state = f"trained; defenses to run: {', '.join(missing)}" if missing else "done"
    return f"blocked: {cell.blocked}" if cell.blocked and state != "done" else state


def check_settings(out: Path, cells: list[Cell]) -> None:
    """Raise ConfigError if a cell's folder holds a run of another setting than the cell's."""
    from ..config import ConfigError, make_config, setting_differences

    for cell in cells:
        d = cell_dir(out, cell)
        if (d / "config.yaml").is_file() and not RunFolder(d).failed_before_checkpoint():
            diff = setting_differences(RunFolder(d).config(), make_config({**cell.values, "out": str(d)}))
            if diff:
                raise ConfigError(f"cell {cell.name}: {d} holds a run of a different setting ({'; '.join(diff[:3])}); "
                                  "move it away or choose another --out")


def run_cell(values: dict[str, Any], defenses: list[str], run_dir: str) -> str:
    """Train (or resume, or skip) one cell, then run its missing defenses. Top-level: submitit pickles it."""
    from ..config import make_config
    from ..defenses import load_attack_run, run_defense
    from ..pipeline import run_training

    path = Path(run_dir)
    if not is_finished(path):
        run_training(make_config({**values, "out": run_dir}))
    missing = [d for d in defenses if not (path / "defenses" / d / "defense.json").is_file()]
    if missing:
        run = load_attack_run(path, device=values.get("device", "auto"))
        for name in missing:
            run_defense(name, run)
    return run_dir


def run_rolling(submit: Callable[[Cell], Any], cells: list[Cell], jobs: int, done: Callable[[], None],
                poll_s: float = 2.0) -> None:
    """Keep ``jobs`` cells running at once: a new one starts as soon as any finishes.

    Waves of ``jobs`` cells (the first version) left a core idle whenever a short clean cell
    shared a wave with a CUBA cell three times as long. A failed cell raises (its job's error)
    once the cells already running have been waited for, so none is orphaned mid-write. An
    interrupt (Ctrl-C, or SIGTERM turned into one by the CLI) stops the running jobs before it
    propagates (:func:`stop_job`): submitit's local workers survive their parent and ignore SIGTERM,
    so they would go on training into the run folders and hold the lock that refuses the resumed
    grid (seen 2026-11-30).
    """
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    running: list[Any] = []
    try:
        _roll(submit, list(cells), running, jobs, done, poll_s)
    except KeyboardInterrupt:
        for job in running:
            stop_job(job)
        raise


def _child_pids(pid: int) -> list[int]:
    """The direct children of ``pid`` (Linux /proc; [] where there is none, e.g. macOS)."""
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (OSError, ValueError):
        return []


def stop_job(job: Any) -> None:
    """Stop one local submitit job now. ``job.cancel()`` alone is not enough: it sends SIGINT to the
    job's controller, and a grid started in the background of a shell without job control (nohup,
    ``&`` in a script) passes SIGINT on as *ignored*, so the controller and its worker run on
    (measured: both cells of a 2-cell grid trained to the end after SIGTERM). So the worker(s) and
    the controller are also SIGKILLed; the run folder's flock dies with them and the cell resumes
    from its last checkpoint next time. ``_process`` is submitit's LocalJob attribute for the
    controller; a job without it (SLURM, a test double) only gets the cancel."""
    job.cancel(check=False)
    proc = getattr(job, "_process", None)
    if proc is None or proc.poll() is not None:
        return
    for pid in _child_pids(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:  # it ended meanwhile
            pass
    proc.kill()
    proc.wait(timeout=30)


def _roll(submit: Callable[[Cell], Any], queue: list[Cell], running: list[Any], jobs: int,
          done: Callable[[], None], poll_s: float) -> None:
    """run_rolling's loop; ``running`` is the caller's list, so an interrupt can reach the live jobs."""
    error = None
    while queue or running:
        while queue and len(running) < jobs and error is None:
            running.append(submit(queue.pop(0)))
        finished = [j for j in running if j.done()]
        if not finished:
            time.sleep(poll_s)
            continue
        for job in finished:
            running.remove(job)
            try:
                job.result()
                done()
            except Exception as exc:  # noqa: BLE001 -- re-raised below, after the others finish
                error = error or exc
        if error is not None and not running:
            raise error


def run_grid(
    cells: list[Cell], out: Path, executor: str = "sequential", jobs: int = 2, slurm: dict[str, Any] | None = None,
    wait: bool = True, log: Callable[[str], None] = print,
) -> list[Cell]:
    """Run every cell that is not done; return the cells that were pending. Blocked cells (no
    local copy of their data set) are skipped and named, so one missing data set does not stop
    the others."""
    check_settings(out, cells)
    blocked = [c for c in cells if cell_state(out, c).startswith("blocked")]
    for why in dict.fromkeys(c.blocked for c in blocked):
        log(f"blocked: {why}: {', '.join(c.name for c in blocked if c.blocked == why)}")
    skip = {c.name for c in blocked}
    pending = [c for c in cells if c.name not in skip and not is_done(out, c)]
    log(f"{len(cells)} cells, {len(cells) - len(pending) - len(blocked)} done, {len(blocked)} blocked (no local data), "
        f"{len(pending)} to run ({executor})")
    if not pending:
        return pending
    if executor == "sequential":
        for cell in tqdm(pending, desc="grid", unit="cell"):
            tqdm.write(f"-> {cell.name}")
            # in this process the run's own bar shows under the grid's (progress is not part of a setting)
            run_cell({**cell.values, "progress": True}, cell.defenses, str(cell_dir(out, cell)))
        return pending
    try:
        import submitit
    except ImportError:
        from ..config import ConfigError

        raise ConfigError(f"--executor {executor} needs submitit: pip install -e \".[cluster]\" "
                          "(or use --executor sequential)") from None

    folder = Path(out) / "submitit"
    if executor == "local":
        ex = submitit.LocalExecutor(folder=folder)
        ex.update_parameters(timeout_min=int((slurm or {}).get("timeout_min", 24 * 60)))
        bar = tqdm(total=len(pending), desc="grid", unit="cell")
        run_rolling(lambda c: ex.submit(run_cell, c.values, c.defenses, str(cell_dir(out, c))), pending, jobs,
                    lambda: bar.update(1))
        bar.close()
        return pending
    if executor == "slurm":
        ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
        ex.update_parameters(**(slurm or {}))
        with ex.batch():
            submitted = [ex.submit(run_cell, c.values, c.defenses, str(cell_dir(out, c))) for c in pending]
        log("submitted SLURM jobs " + ", ".join(j.job_id for j in submitted) + f" (logs in {folder})")
        if wait:
            for job in tqdm(submitted, desc="grid", unit="cell"):
                job.result()
        return pending
    raise ValueError(f"executor must be sequential, local or slurm, got {executor!r}")
