"""CPU seconds used during a phase, by the load generator, gunicorn (master + workers), PostgreSQL, and the machine."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[str, int, float] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("latin-1")
    except OSError:
        return None
    comm = raw[raw.find("(") + 1:raw.rfind(")")]
    fields = raw[raw.rfind(")") + 2:].split()
    return comm, int(fields[1]), (int(fields[11]) + int(fields[12])) / TICK


def _all() -> dict[int, tuple[str, int, float]]:
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            s = _stat(int(entry))
            if s:
                out[int(entry)] = s
    return out


def _machine() -> tuple[float, float]:
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + parts[4]
    return sum(parts) / TICK, idle / TICK


@dataclass
class CpuSample:
    wall: float
    procs: dict[int, tuple[str, int, float]]
    machine: tuple[float, float]


def sample() -> CpuSample:
    return CpuSample(time.monotonic(), _all(), _machine())


def _group(procs: dict[int, tuple[str, int, float]], server_pid: int | None) -> dict[str, float]:
    groups = {"gunicorn": 0.0, "postgres": 0.0, "wrk": 0.0}
    for pid, (comm, ppid, cpu) in procs.items():
        if server_pid is not None and (pid == server_pid or ppid == server_pid):
            groups["gunicorn"] += cpu
        elif comm == "postgres":
            groups["postgres"] += cpu
        elif comm == "wrk":
            groups["wrk"] += cpu
    return groups


def usage(
    before: CpuSample, after: CpuSample, server_pid: int | None, extra: dict[str, float] | None = None
) -> dict[str, float]:
    """Cores used on average (CPU seconds / wall seconds) per group between two samples.

    Processes that exited in between (wrk itself) are missing from ``after``: the caller passes
    their CPU seconds (from wait4's rusage) in ``extra``, as it does the harness's own CPU when
    the harness is the load generator.
    """
    wall = after.wall - before.wall
    # Only count CPU a process used after `before` (new processes start from zero).
    delta: dict[int, tuple[str, int, float]] = {}
    for pid, (comm, ppid, cpu) in after.procs.items():
        prior = before.procs.get(pid)
        base = prior[2] if prior and prior[0] == comm else 0.0
        delta[pid] = (comm, ppid, cpu - base)
    groups = {k: v / wall for k, v in _group(delta, server_pid).items()}
    total = (after.machine[0] - before.machine[0])
    idle = (after.machine[1] - before.machine[1])
    ncpu = os.cpu_count() or 1
    groups["machine_busy"] = (total - idle) / total * ncpu if total else 0.0
    for name, seconds in (extra or {}).items():
        groups[name] = groups.get(name, 0.0) + seconds / wall
    groups["wall"] = wall
    return groups
