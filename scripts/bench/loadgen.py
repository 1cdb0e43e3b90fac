"""Load generators: wrk (closed loop, max throughput) and a Python open-loop generator (fixed rate).

Fixed rate: wrk2 is not packaged in Debian, and wrk's Lua ``delay()`` only adds think time per
connection, which is still a closed loop (a slow server lowers the offered rate and hides its own
latency: coordinated omission). So the fixed rate is an open-loop schedule in asyncio: request i
is due at t0 + i/rate, is sent on its own connection whatever happened to earlier ones, and its
latency is measured from when it was *due*, so any lag of the generator or queueing in the server
counts against the server, never for it. The generator's CPU use and send lag are reported to
show that it kept to the schedule.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import selectors
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from . import cpu
from .callbacks import Record

LUA = Path(__file__).resolve().parent / "requests.lua"


def wrk_path() -> str | None:
    return shutil.which("wrk")


WRK_MISSING = (
    "wrk is not installed: the max-throughput mode needs it (Debian/Ubuntu: apt-get install -y wrk).\n"
    "Falling back to the Python closed-loop generator (several processes); compare its CPU use with the server's."
)


@dataclass
class PhaseResult:
    """What one timed load phase measured."""

    label: str
    duration: float
    responses: int
    statuses: dict[str, int]
    latency_ms: dict[str, float]
    errors: dict[str, int] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    exhausted: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def ok(self) -> int:
        return self.statuses.get("200", 0)

    @property
    def rate(self) -> float:
        """Successful (200) responses per second."""
        return self.ok / self.duration if self.duration else 0.0


def run_wrk(
    base: str, request_file: Path, *, connections: int, threads: int, duration: float, wrap: bool,
    server_pid: int | None, label: str, timeout_s: int = 10,
) -> PhaseResult:
    """Run wrk with requests.lua; CPU of wrk, gunicorn and PostgreSQL is sampled around it."""
    exe = wrk_path()
    assert exe, WRK_MISSING
    threads = max(1, min(threads, connections))
    cmd = [exe, "-t", str(threads), "-c", str(connections), "-d", f"{duration:g}s", "--timeout", f"{timeout_s}s",
           "-s", str(LUA), base, "--", str(request_file), "wrap" if wrap else "stop", str(threads)]
    before = cpu.sample()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    output = proc.stdout.read().decode("utf-8", "replace")
    _, status, rusage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    after = cpu.sample()
    line = next((l for l in output.splitlines() if l.startswith("BENCHJSON ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}):\n{output}")
    data = json.loads(line[len("BENCHJSON "):])
    lat = {k: v / 1000.0 for k, v in data["latency_us"].items()}
    statuses = {k: int(v) for k, v in data["statuses"].items()}
    result = PhaseResult(
        label=label,
        duration=data["duration_us"] / 1e6,
        responses=sum(statuses.values()),
        statuses=statuses,
        latency_ms=lat,
        errors={k: v for k, v in data["errors"].items() if v},
        cpu=cpu.usage(before, after, server_pid, {"wrk": rusage.ru_utime + rusage.ru_stime}),
        exhausted=bool(data["exhausted_threads"]),
        extra={"wrk_output": output, "wraps": data["wraps"], "cmd": " ".join(cmd),
               "other_top": cpu.top_others(before, after, server_pid)},
    )
    if result.exhausted:
        result.notes.append("request file exhausted before the end (rate not valid; the harness retries)")
    return result


async def _one(host: str, port: int, raw: bytes, due: float, timeout: float) -> tuple[float, float, float, str]:
    started = time.perf_counter()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        writer.write(raw)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        status = head.split(b" ", 2)[1].decode()
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        if length:
            await asyncio.wait_for(reader.readexactly(length), timeout)
        writer.close()
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as exc:
        status = type(exc).__name__
    return due, started, time.perf_counter(), status


def _pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = min(len(values) - 1, max(0, int(round(p / 100 * len(values) + 0.5)) - 1))
    return values[k]


async def _open_loop(host: str, port: int, raws: list[bytes], rate: float, timeout: float) -> list[tuple]:
    loop_start = time.perf_counter() + 0.05
    tasks = []
    for i, raw in enumerate(raws):
        due = loop_start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(_one(host, port, raw, due, timeout)))
    return await asyncio.gather(*tasks)


@contextlib.contextmanager
def _without_gc() -> Iterator[None]:
    """No garbage collection while a phase sends: the generator's pauses must not count as the server's latency.

    A full collection of this process's heap (the pre-built requests, the results so far) paused
    the generator for tens of ms, and the requests it then sent late were timed from their due
    time. A 13 s phase allocates a few MB without collecting.
    """
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def run_fixed_rate(
    host: str, port: int, records: list[Record], *, rate: float, lead_in: float, server_pid: int | None, label: str,
    timeout: float = 10.0,
) -> PhaseResult:
    """Offer ``rate`` requests/s open-loop; the first ``lead_in`` seconds are not counted."""
    raws = [r.raw(f"{host}:{port}") for r in records]
    before = cpu.sample()
    cpu0 = time.process_time()
    with _without_gc():
        results = asyncio.run(_open_loop(host, port, raws, rate, timeout))
    self_cpu = time.process_time() - cpu0
    after = cpu.sample()
    t0 = results[0][0]
    counted = [r for r in results if r[0] - t0 >= lead_in]
    statuses: dict[str, int] = {}
    for r in counted:
        statuses[r[3]] = statuses.get(r[3], 0) + 1
    lat = [(end - due) * 1000 for due, _s, end, st in counted if st == "200"]
    service = [(end - start) * 1000 for due, start, end, st in counted if st == "200"]
    lag = [(start - due) * 1000 for due, start, _e, _st in counted]
    span = counted[-1][0] - counted[0][0] + 1 / rate if counted else 0.0
    # Achieved: 200s per second from the first due time to the last completion (a server that
    # cannot keep up finishes late, and this says so).
    finish = max(r[2] for r in counted) - counted[0][0] if counted else 0.0
    result = PhaseResult(
        label=label,
        duration=span,
        responses=len(counted),
        statuses=statuses,
        latency_ms={"p50": _pct(lat, 50), "p90": _pct(lat, 90), "p99": _pct(lat, 99), "p999": _pct(lat, 99.9),
                    "max": max(lat) if lat else float("nan"), "mean": sum(lat) / len(lat) if lat else float("nan")},
        cpu=cpu.usage(before, after, server_pid, {"loadgen": self_cpu}),
        extra={
            "offered_rate": rate,
            "achieved_rate": len([r for r in counted if r[3] == "200"]) / finish if finish else 0.0,
            "service_ms": {"p50": _pct(service, 50), "p99": _pct(service, 99)},
            "other_top": cpu.top_others(before, after, server_pid),
            "lead_in_ok": sum(1 for r in results if r[0] - t0 < lead_in and r[3] == "200"),
            "send_lag_ms": {"p50": _pct(lag, 50), "p99": _pct(lag, 99), "max": max(lag) if lag else float("nan")},
            # (latency ms, seconds after the first request was due): when the tail happened.
            "slowest": sorted(((end - due) * 1000, due - t0) for due, _s, end, st in counted if st == "200")[-8:][::-1],
        },
    )
    return result


def flood_source(index: int, sources: int) -> str | None:
    """The loopback address request ``index`` of a flood comes from, spread over ``sources`` (None: the default one).

    Linux routes all of 127.0.0.0/8 to the loopback interface, so a client socket bound to
    127.1.x.y reaches a server on 127.0.0.1 and the server sees that address as its peer.
    """
    if sources <= 1:
        return None
    n = index % sources
    return f"127.1.{n // 250}.{n % 250 + 1}"


def run_flood(host: str, port: int, raws: list[bytes], *, rate: float, timeout: float = 10.0, sources: int = 1) -> dict:
    """Send ``raws`` open-loop at ``rate``/s, each on its own connection, as cheaply as Python can.

    For floods, whose latency nobody measures: only the answers' statuses, the achieved rate and
    the generator's own cost. run_fixed_rate's asyncio machinery cost ~0.45 ms of CPU a request,
    so a 1,000/s flood took ~0.45 of the machine's 2 cores from the server it was measuring. Here a
    selectors loop over non-blocking sockets does only what a request needs: connect, send, read
    until the server closes (it does: no keep-alive), keep the status code. With ``sources`` > 1
    the requests take turns among that many source addresses (flood_source).
    """
    sel = selectors.DefaultSelector()
    statuses: dict[str, int] = {}
    lags: list[float] = []

    def done(sock: socket.socket, status: str) -> None:
        sel.unregister(sock)
        sock.close()
        statuses[status] = statuses.get(status, 0) + 1

    cpu0 = time.process_time()
    start = time.perf_counter() + 0.05
    deadline_after_last = start + len(raws) / rate + timeout
    last_end = start
    sent = 0
    with _without_gc():
        # The selector's map holds the requests in flight.
        while (sent < len(raws) or sel.get_map()) and time.perf_counter() < deadline_after_last:
            now = time.perf_counter()
            while sent < len(raws) and start + sent / rate <= now:
                lags.append(now - (start + sent / rate))
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setblocking(False)
                source = flood_source(sent, sources)
                if source is not None:
                    sock.bind((source, 0))
                sock.connect_ex((host, port))  # EINPROGRESS; writable once connected
                # [what is left to send, what was read]
                sel.register(sock, selectors.EVENT_WRITE, [memoryview(raws[sent]), bytearray()])
                sent += 1
            wait = max(0.0, start + sent / rate - time.perf_counter()) if sent < len(raws) else 0.05
            for key, mask in sel.select(wait):
                sock, state = key.fileobj, key.data
                try:
                    if mask & selectors.EVENT_WRITE:
                        state[0] = state[0][sock.send(state[0]):]
                        if not state[0]:
                            sel.modify(sock, selectors.EVENT_READ, state)
                        continue
                    chunk = sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    done(sock, type(exc).__name__)
                    continue
                if chunk:
                    state[1] += chunk
                    continue
                parts = bytes(state[1][:32]).split(b" ", 2)
                done(sock, parts[1].decode() if len(parts) > 1 else "no answer")
                last_end = time.perf_counter()
    for key in list(sel.get_map().values()):
        done(key.fileobj, "timeout")
    answered = sum(n for status, n in statuses.items() if status.isdigit())
    return {
        "statuses": statuses,
        "achieved": answered / (last_end - start) if last_end > start else 0.0,
        "cpu": time.process_time() - cpu0,
        "send_lag_p99": _pct([lag * 1000 for lag in lags], 99),
    }


# --- fallback when wrk is missing: a closed-loop Python generator in several processes ---------

def _closed_loop_worker(args: tuple) -> dict:
    host, port, raws, concurrency, duration, wrap, timeout = args

    async def main() -> list[tuple[float, str]]:
        out: list[tuple[float, str]] = []
        deadline = time.perf_counter() + duration
        state = {"i": 0, "exhausted": False}

        async def conn_loop() -> None:
            while time.perf_counter() < deadline:
                if state["i"] >= len(raws):
                    if not wrap:
                        state["exhausted"] = True
                        return
                    state["i"] = 0
                raw = raws[state["i"]]
                state["i"] += 1
                due = time.perf_counter()
                _d, _s, end, status = await _one(host, port, raw, due, timeout)
                out.append(((end - due) * 1000, status))

        await asyncio.gather(*(conn_loop() for _ in range(concurrency)))
        return out, state["exhausted"]

    c0 = time.process_time()
    t0 = time.perf_counter()
    with _without_gc():
        samples, exhausted = asyncio.run(main())
    return {"samples": samples, "cpu": time.process_time() - c0, "wall": time.perf_counter() - t0,
            "exhausted": exhausted}


def run_python_closed_loop(
    host: str, port: int, records: list[Record], *, connections: int, processes: int, duration: float, wrap: bool,
    server_pid: int | None, label: str, timeout: float = 10.0,
) -> PhaseResult:
    """Closed loop like wrk (``connections`` in flight), spread over ``processes`` processes."""
    import multiprocessing

    raws = [r.raw(f"{host}:{port}") for r in records]
    processes = max(1, min(processes, connections))
    per = [connections // processes + (1 if i < connections % processes else 0) for i in range(processes)]
    jobs = [(host, port, raws[i::processes], per[i], duration, wrap, timeout) for i in range(processes)]
    before = cpu.sample()
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        parts = pool.map(_closed_loop_worker, jobs)
    after = cpu.sample()
    samples = [s for p in parts for s in p["samples"]]
    wall = max(p["wall"] for p in parts)
    statuses: dict[str, int] = {}
    for _lat, st in samples:
        statuses[st] = statuses.get(st, 0) + 1
    lat = [l for l, st in samples if st == "200"]
    return PhaseResult(
        label=label, duration=wall, responses=len(samples), statuses=statuses,
        latency_ms={"p50": _pct(lat, 50), "p90": _pct(lat, 90), "p99": _pct(lat, 99), "p999": _pct(lat, 99.9),
                    "max": max(lat) if lat else float("nan"), "mean": sum(lat) / len(lat) if lat else float("nan")},
        cpu=cpu.usage(before, after, server_pid, {"loadgen": sum(p["cpu"] for p in parts)}),
        exhausted=any(p["exhausted"] for p in parts),
        notes=["python closed-loop generator (wrk missing)"],
    )
