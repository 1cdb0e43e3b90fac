"""Summarise py-spy raw (collapsed) stacks of gunicorn workers: where a callback's time goes.

Two recordings of the same load, same rate and duration: ``--idle`` (every sample: wall-clock time,
including waits for the database, locks, fsync and the CPU) and py-spy's default mode (only
samples where the worker thread was running or runnable: CPU). Only samples inside gunicorn's
handle_request are counted. A span's share is inclusive (a sample counts for every span whose
function is on its stack), so shares do not add up to 100%. Besides the fixed spans below, every
function of receiver/ on the stacks is listed, so the summary follows the code as it changes.

    python scripts/bench/pyspy_summary.py wall.txt cpu.txt
"""

from __future__ import annotations

import re
import sys
from collections import Counter

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<path>[^():]+):\d+\)$")

# (label, function name or None, path fragment or None); a frame matches when both given parts match.
SPANS: list[tuple[str, str | None, str | None]] = [
    ("handle_request (all)", "handle_request", "gunicorn/workers/sync.py"),
    ("  HTTP parse (gunicorn)", None, "gunicorn/http/"),
    ("  response write (gunicorn)", "write", "gunicorn/util.py"),
    ("  Flask wsgi_app", "wsgi_app", "flask/app.py"),
    ("    voucher_callback (the view)", "voucher_callback", "receiver/webhook.py"),
    ("      verify_signed (RSA + canonical JSON)", "verify_signed", "receiver/signature.py"),
    ("      Session/connection begin (checkout, BEGIN)", "_connection_for_bind", "sqlalchemy/orm/session.py"),
    ("        pool checkout", "_checkout", "sqlalchemy/pool/base.py"),
    ("          pre-ping (PostgreSQL)", "do_ping", None),
    ("        BEGIN IMMEDIATE (SQLite lock wait)", "_on_begin", "receiver/db.py"),
    ("      all DBAPI execute (statements)", "do_execute", "sqlalchemy/engine/default.py"),
    ("      DBAPI commit (COMMIT; fsync on SQLite)", "do_commit", "sqlalchemy/engine/default.py"),
    ("      logging", None, "logging/__init__.py"),
    ("      prometheus_client", None, "prometheus_client/"),
]


def _parse(path: str) -> list[tuple[list[tuple[str, str]], int]]:
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            stack, _, count = line.rpartition(" ")
            frames = []
            for raw in stack.split(";"):
                m = _FRAME.match(raw)
                if m:
                    frames.append((m.group("func"), m.group("path")))
            out.append((frames, int(count)))
    return out


def _matches(frame: tuple[str, str], func: str | None, path: str | None) -> bool:
    # py-spy names methods by qualified name (SyncWorker.handle_request, Session.flush).
    name = frame[0]
    return (func is None or name == func or name.endswith("." + func)) and (path is None or path in frame[1])


def _shares(path: str) -> tuple[int, int, dict[str, int], Counter, Counter]:
    samples = _parse(path)
    total = sum(c for _f, c in samples)
    in_request = 0
    spans: dict[str, int] = {label: 0 for label, _fn, _p in SPANS}
    leaves: Counter = Counter()
    project: Counter = Counter()
    for frames, count in samples:
        if not any(_matches(fr, "handle_request", "gunicorn/workers/sync.py") for fr in frames):
            continue
        in_request += count
        for label, func, frag in SPANS:
            if any(_matches(fr, func, frag) for fr in frames):
                spans[label] += count
        for name in {f"{fn} ({path})" for fn, path in frames if path.startswith("receiver/")}:
            project[name] += count
        leaf = frames[-1] if frames else ("?", "?")
        leaves[f"{leaf[0]} ({leaf[1].split('site-packages/')[-1]})"] += count
    return total, in_request, spans, leaves, project


def summarise(wall_path: str, cpu_path: str) -> dict:
    wall_total, wall_req, wall_spans, wall_leaves, wall_project = _shares(wall_path)
    cpu_total, cpu_req, cpu_spans, cpu_leaves, cpu_project = _shares(cpu_path)
    return {
        "wall": {"samples": wall_total, "in_request": wall_req, "spans": wall_spans,
                 "leaves": wall_leaves.most_common(15), "project": dict(wall_project)},
        "cpu": {"samples": cpu_total, "in_request": cpu_req, "spans": cpu_spans, "leaves": cpu_leaves.most_common(15),
                "project": dict(cpu_project)},
    }


def render(summary: dict, indent: str = "") -> str:
    w, c = summary["wall"], summary["cpu"]
    lines = [
        f"{indent}py-spy over all workers: wall samples in handle_request {w['in_request']} "
        f"(of {w['samples']}); on-CPU samples in handle_request {c['in_request']} (of {c['samples']})",
        f"{indent}{'span (inclusive)':<64}{'% of wall':>10}{'% of CPU':>10}  CPU/wall",
    ]

    def row(label: str, wv: int, cv: int) -> str:
        wp = wv / w["in_request"] if w["in_request"] else 0.0
        cp = cv / c["in_request"] if c["in_request"] else 0.0
        # Share of the span's wall time the worker was on (or waiting for) a CPU: same load, duration, rate.
        ratio = cv / wv if wv else 0.0
        return f"{indent}{label[:64]:<64}{wp:>10.1%}{cp:>10.1%}  {ratio:>7.0%}"

    for label, _f, _p in SPANS:
        lines.append(row(label, w["spans"][label], c["spans"][label]))
    lines.append(f"{indent}project functions on the stack (inclusive, >= 1% of wall):")
    for name, wv in sorted(w["project"].items(), key=lambda kv: -kv[1]):
        if w["in_request"] and wv / w["in_request"] >= 0.01:
            lines.append(row("  " + name, wv, c["project"].get(name, 0)))
    lines.append(f"{indent}top leaf frames, wall (where workers were when sampled):")
    for name, n in w["leaves"][:10]:
        lines.append(f"{indent}  {n / w['in_request']:6.1%}  {name}")
    lines.append(f"{indent}top leaf frames, on CPU:")
    for name, n in c["leaves"][:10]:
        lines.append(f"{indent}  {n / c['in_request']:6.1%}  {name}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(summarise(sys.argv[1], sys.argv[2])))
