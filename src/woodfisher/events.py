"""Named progress events of long jobs, for tools and tests that watch them.

Long jobs (``gradual``, and every resumable command) call :func:`emit` at points worth
watching: after a resume file is written, after a pruning step. By default this does nothing.
With ``WOODFISHER_EVENT_LOG=PATH`` in the environment, each event is appended to ``PATH`` as a
JSON line (flushed and fsynced, so a watcher sees it at once). With
``WOODFISHER_EVENT_GATE=PATH`` too, the job then waits until ``PATH`` holds a number at least
the event's sequence number (1 for the first event of the process): a watcher releases the
job one event at a time, which lets a fault-injection test kill it at a chosen point however
fast or slow the machine is.

Example:
    >>> emit("epoch_saved", epoch=1)  # no environment variable set: nothing happens
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

LOG_ENV = "WOODFISHER_EVENT_LOG"
GATE_ENV = "WOODFISHER_EVENT_GATE"

_count = 0


def emit(name: str, **info: object) -> None:
    """Record the event ``name`` (and wait at the gate) when the environment asks for it.

    Args:
        name: The event, e.g. ``"epoch_saved"``.
        **info: JSON-able details (epoch number, path written, ...).
    """
    log = os.environ.get(LOG_ENV)
    if not log:
        return
    global _count
    _count += 1
    record = {"event": name, "seq": _count, "pid": os.getpid(),
              "rank": int(os.environ.get("RANK", "0")), **info}
    with open(log, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())
    gate = os.environ.get(GATE_ENV)
    if gate:
        _wait(Path(gate), _count)


def _wait(gate: Path, seq: int) -> None:
    while True:
        try:
            if int(gate.read_text().strip() or 0) >= seq:
                return
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(0.01)
