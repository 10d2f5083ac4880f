"""Fault injection for tests: run a real CLI process, kill it at a named event, resume it.

The process under test reports named events (``woodfisher.events``) to a log file and waits at
a gate after each one. :func:`kill_at_event` releases it event by event up to a chosen one, lets
it run on for a random moment and sends SIGKILL. Because the process stops at the next gate at
the latest, the kill always lands mid-run, before the job's last event, on any machine.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from woodfisher.events import GATE_ENV, LOG_ENV

SRC = Path(__file__).parents[1] / "src"


def cli_command(*args: str) -> list[str]:
    """``python -m woodfisher ARGS`` with this checkout's interpreter.

    Returns:
        The argv.
    """
    return [sys.executable, "-m", "woodfisher", *args]


def _env(extra: dict[str, str]) -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **extra}


def events(log: Path) -> list[dict]:
    """The events a process has written so far.

    Returns:
        One dict per event line.
    """
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def kill_at_event(
    argv: list[str],
    workdir: Path,
    event: str,
    nth: int,
    rng: random.Random,
    timeout: float = 600.0,
) -> list[dict]:
    """Run ``argv`` until its ``nth`` ``event``, let it go on for a random moment, SIGKILL it.

    Args:
        argv: The command.
        workdir: Where the event log and the gate file go.
        event: Event name to wait for (``"epoch_saved"``).
        nth: Which occurrence; must not be the job's last event.
        rng: Source of the random moment (0 to 0.3 s after release, or at the gate itself).
        timeout: Seconds to wait for the event before failing.

    Returns:
        The events seen before the kill.

    Raises:
        AssertionError: If the process ended on its own, failed, or never reached the event.
    """
    tag = f"{time.monotonic_ns()}"
    log, gate = workdir / f"events-{tag}.jsonl", workdir / f"gate-{tag}"
    gate.write_text("0")
    proc = subprocess.Popen(
        argv, env=_env({LOG_ENV: str(log), GATE_ENV: str(gate)}),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + timeout
    try:
        while True:
            seen = events(log)
            hits = [e for e in seen if e["event"] == event]
            if len(hits) >= nth:
                break
            if proc.poll() is not None:
                raise AssertionError(
                    f"{argv} ended (code {proc.returncode}) before event {event!r} #{nth}: "
                    f"{proc.stderr.read().decode()[-2000:]}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"no event {event!r} #{nth} within {timeout} s")
            # Release every event up to the wanted one; the job waits at each gate.
            if seen and int(gate.read_text()) < seen[-1]["seq"]:
                gate.write_text(str(seen[-1]["seq"]))
            time.sleep(0.01)
        if rng.random() < 0.5:
            # Let it run on past the event: the kill lands inside the next unit of work (or at
            # the next gate, before anything after it is written).
            gate.write_text(str(hits[nth - 1]["seq"]))
            time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"exit code {proc.returncode}, not SIGKILL"
    return events(log)


def run_to_end(argv: list[str], timeout: float = 900.0) -> subprocess.CompletedProcess:
    """Run ``argv`` to completion (no gate).

    Returns:
        The completed process (stdout and stderr captured as text).

    Raises:
        AssertionError: If it fails.
    """
    res = subprocess.run(argv, env=_env({}), capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return res
