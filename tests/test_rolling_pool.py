"""The local executor's rolling pool: ``jobs`` cells at once, the next one starting as soon as any finishes."""

from __future__ import annotations

from pathlib import Path

import pytest

from cuba.reproduce import runner


class FakeJob:
    """A job that is done after ``polls`` calls of done(); its result raises ``error`` if set."""

    def __init__(self, name: str, polls: int, log: list[str], error: Exception | None = None) -> None:
        self.name, self.polls, self.log, self.error = name, polls, log, error

    def done(self) -> bool:
        self.polls -= 1
        return self.polls < 0

    def cancel(self, check: bool = True) -> None:
        self.log.append(f"cancel {self.name}")

    def result(self) -> str:
        self.log.append(f"end {self.name}")
        if self.error is not None:
            raise self.error
        return self.name


def test_a_short_cell_frees_its_slot_without_waiting_for_the_long_one() -> None:
    log: list[str] = []
    lengths = {"long": 6, "short": 0, "next": 0, "last": 0}

    def submit(cell: str) -> FakeJob:
        log.append(f"start {cell}")
        return FakeJob(cell, lengths[cell], log)

    finished: list[int] = []
    runner.run_rolling(submit, list(lengths), jobs=2, done=lambda: finished.append(1), poll_s=0)
    # waves of two would start "next" only after "long" ended; the pool starts it right after "short"
    assert log.index("start next") < log.index("end long")
    assert log.index("start last") < log.index("end long")
    assert len(finished) == 4


def test_never_more_than_jobs_at_once() -> None:
    live, peak = [0], [0]

    class Counted(FakeJob):
        def result(self) -> str:
            live[0] -= 1
            return self.name

    def submit(cell: int) -> FakeJob:
        live[0] += 1
        peak[0] = max(peak[0], live[0])
        return Counted(str(cell), cell % 3, [])

    runner.run_rolling(submit, list(range(9)), jobs=3, done=lambda: None, poll_s=0)
    assert peak[0] == 3 and live[0] == 0


def test_a_failed_cell_raises_after_the_running_ones_finish_and_starts_no_more() -> None:
    log: list[str] = []
    spec = {"bad": (0, RuntimeError("cell bad failed")), "slow": (3, None), "never": (0, None)}

    def submit(cell: str) -> FakeJob:
        log.append(f"start {cell}")
        return FakeJob(cell, spec[cell][0], log, spec[cell][1])

    with pytest.raises(RuntimeError, match="cell bad failed"):
        runner.run_rolling(submit, list(spec), jobs=2, done=lambda: None, poll_s=0)
    assert "end slow" in log and "start never" not in log


def test_an_interrupt_cancels_the_running_jobs_and_propagates() -> None:
    # the local executor's workers outlive an interrupted grid unless it cancels them
    log: list[str] = []

    class Interrupting(FakeJob):
        def done(self) -> bool:
            if self.name == "b":
                raise KeyboardInterrupt
            return False

    def submit(cell: str) -> FakeJob:
        log.append(f"start {cell}")
        return Interrupting(cell, 0, log)

    with pytest.raises(KeyboardInterrupt):
        runner.run_rolling(submit, ["a", "b", "c"], jobs=2, done=lambda: None, poll_s=0)
    assert log == ["start a", "start b", "cancel a", "cancel b"]


def test_jobs_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="jobs must be >= 1, got 0"):
        runner.run_rolling(lambda c: c, ["a"], jobs=0, done=lambda: None)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads a process's children from Linux /proc")
def test_stop_job_kills_a_controller_and_worker_that_ignore_sigint_and_sigterm(tmp_path: Path) -> None:
    """What a grid started with nohup or `&` leaves after SIGTERM: a controller and its worker that
    inherited SIGINT as ignored (and a worker that ignores SIGTERM, as submitit's does)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    ready = tmp_path / "worker.pid"
    worker = ("import os, signal, time, pathlib; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
              f"pathlib.Path({str(ready)!r}).write_text(str(os.getpid())); time.sleep(300)")
    controller = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {worker!r}]); time.sleep(300)"
    proc = subprocess.Popen([sys.executable, "-c", controller], preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    for _ in range(200):
        if ready.exists() and ready.read_text():
            break
        time.sleep(0.05)
    worker_pid = int(ready.read_text())

    class LocalLike:
        _process = proc
        cancelled = False

        def cancel(self, check: bool = True) -> None:
            self.cancelled = True
            proc.send_signal(signal.SIGINT)  # what submitit's cancel does: ignored here

    job = LocalLike()
    try:
        runner.stop_job(job)
        assert job.cancelled and proc.poll() is not None
        for _ in range(100):  # the SIGKILLed worker is reaped by init; /proc/PID goes or turns zombie
            status = Path(f"/proc/{worker_pid}/status")
            if not status.exists() or "zombie" in status.read_text():
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"worker {worker_pid} still running after stop_job")
    finally:  # a failing run leaves no sleeper behind
        for pid in (worker_pid, proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
