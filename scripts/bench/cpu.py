"""CPU seconds used during a phase, by the load generator, gunicorn (master + workers), PostgreSQL, and the machine."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[str, int, float, int] | None:
    """(comm, ppid, CPU seconds, start time): the start time tells a reused pid from the same process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("latin-1")
    except OSError:
        return None
    comm = raw[raw.find("(") + 1:raw.rfind(")")]
    fields = raw[raw.rfind(")") + 2:].split()
    return comm, int(fields[1]), (int(fields[11]) + int(fields[12])) / TICK, int(fields[19])


def process_seconds(pids: list[int]) -> float:
    """CPU seconds (user + system) used so far by these processes; ones that are gone count nothing."""
    return sum(found[2] for found in map(_stat, pids) if found is not None)


def context_switches(pids: list[int]) -> tuple[int, int]:
    """(voluntary, involuntary) context switches so far of every thread of these processes.

    Voluntary: the thread blocked (a lock, the disk, a socket); involuntary: the scheduler took
    its core away. Threads or processes gone meanwhile drop out of the sum.
    """
    voluntary = involuntary = 0
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/status", "rb") as f:
                    for line in f:
                        if line.startswith(b"voluntary_ctxt_switches:"):
                            voluntary += int(line.split()[1])
                        elif line.startswith(b"nonvoluntary_ctxt_switches:"):
                            involuntary += int(line.split()[1])
            except OSError:
                continue
    return voluntary, involuntary


def postgres_backend_pids(engine) -> list[int]:  # noqa: ANN001
    """PIDs of the PostgreSQL backends serving the engine's database, except the one asking.

    Ask through an engine other than the measured one: its pooled connection would be the one left out.
    """
    from sqlalchemy import text

    with engine.connect() as conn:
        return list(conn.scalars(text(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()")))


def _all() -> dict[int, tuple[str, int, float, int]]:
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            s = _stat(int(entry))
            if s:
                out[int(entry)] = s
    return out


def _machine() -> tuple[float, float, float]:
    """(total, idle, steal) CPU seconds of the machine; steal: time the hypervisor gave our vCPUs to others."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + parts[4]
    steal = parts[7] if len(parts) > 7 else 0
    # guest/guest_nice (parts[8:]) are already counted in user/nice.
    return sum(parts[:8]) / TICK, idle / TICK, steal / TICK


@dataclass
class CpuSample:
    wall: float
    procs: dict[int, tuple[str, int, float, int]]
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
    for pid, (comm, ppid, cpu, start) in after.procs.items():
        prior = before.procs.get(pid)
        base = prior[2] if prior and prior[3] == start else 0.0
        delta[pid] = (comm, ppid, cpu - base)
    groups = {k: v / wall for k, v in _group(delta, server_pid).items()}
    total = (after.machine[0] - before.machine[0])
    idle = (after.machine[1] - before.machine[1])
    ncpu = os.cpu_count() or 1
    steal = after.machine[2] - before.machine[2]
    groups["machine_busy"] = (total - idle - steal) / total * ncpu if total else 0.0
    groups["steal"] = steal / total * ncpu if total else 0.0
    for name, seconds in (extra or {}).items():
        groups[name] = groups.get(name, 0.0) + seconds / wall
    ours = sum(v for k, v in groups.items() if k not in ("machine_busy", "steal"))
    # Everything else on the machine (other sessions' processes, kernel work not charged to ours).
    groups["other"] = max(0.0, groups["machine_busy"] - ours)
    groups["wall"] = wall
    return groups


def top_others(before: CpuSample, after: CpuSample, server_pid: int | None, n: int = 3) -> list[str]:
    """The processes outside our groups that used the most CPU between two samples ("comm pid cores")."""
    wall = after.wall - before.wall
    me = os.getpid()
    out = []
    for pid, (comm, ppid, cpu_after, start) in after.procs.items():
        if pid == me or (server_pid is not None and (pid == server_pid or ppid == server_pid)):
            continue
        if comm in ("postgres", "wrk"):
            continue
        prior = before.procs.get(pid)
        used = (cpu_after - (prior[2] if prior and prior[3] == start else 0.0)) / wall
        if used >= 0.02:
            out.append((used, f"{comm} {pid} {used:.2f}"))
    return [text for _u, text in sorted(out, reverse=True)[:n]]


def machine_busy(seconds: float = 1.0) -> float:
    """Cores busy on the whole machine over the next ``seconds`` (steal counts as busy: not ours to use)."""
    t0, i0, _s0 = _machine()
    time.sleep(seconds)
    t1, i1, _s1 = _machine()
    total = t1 - t0
    return (total - (i1 - i0)) / total * (os.cpu_count() or 1) if total else 0.0


def busiest_others(exclude: set[int], top: int = 3, seconds: float = 1.0) -> list[tuple[float, int, str]]:
    """The processes (not in ``exclude``) using the most CPU right now: (cores, pid, comm)."""
    a = _all()
    time.sleep(seconds)
    b = _all()
    out = []
    for pid, (comm, _ppid, cpu_b, start) in b.items():
        if pid in exclude or pid not in a or a[pid][3] != start:
            continue
        used = (cpu_b - a[pid][2]) / seconds
        if used > 0.02:
            out.append((used, pid, comm))
    return sorted(out, reverse=True)[:top]


def wait_for_quiet(threshold: float, max_wait: float, exclude: set[int], log) -> str | None:  # noqa: ANN001
    """Wait until other processes use less than ``threshold`` cores; a note if they never did."""
    deadline = time.monotonic() + max_wait
    while True:
        busy = machine_busy(0.5)
        if busy <= threshold:
            return None
        if time.monotonic() > deadline:
            return f"machine still {busy:.2f} cores busy after waiting {max_wait:g}s; measured anyway"
        others = busiest_others(exclude, seconds=0.5)
        log(f"      waiting for the machine to go idle ({busy:.2f} cores busy: "
            f"{', '.join(f'{c} pid {p} {u:.2f}' for u, p, c in others) or 'kernel'}) ...")
        time.sleep(2)
