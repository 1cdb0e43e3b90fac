"""Distinct, signed RM voucher callbacks, generated before a timed phase (signing is not measured).

Every request has its own voucher snapshot, a fresh nonce and a current X-Timestamp (the server
accepts +-900 s, so generate shortly before sending). Signing is RSA-2048 (~1.2 ms each), so it
runs in a process pool.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from tests.support import CALLBACK_PATH, Signer, callback_body, voucher_item

ROOT = Path(__file__).resolve().parents[2]
VECTORS = json.loads((ROOT / "tests" / "fixtures" / "rm-signature.json").read_text(encoding="utf-8"))
LIFECYCLE = ("VALID", "ISSUE", "REDEEMED")
# In the lifecycle mix, BLOCK new codes get their VALID snapshot, then the same BLOCK codes their
# ISSUE, then REDEEMED: the same code comes back BLOCK requests later, never concurrently.
BLOCK = 200


@dataclass(frozen=True)
class Record:
    """One HTTP request as the load generators send it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def raw(self, host: str) -> bytes:
        """The request bytes for the Python load generator (one request per connection)."""
        head = [f"{self.method} {self.path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(self.body)}",
                "Connection: close"]
        head += [f"{k}: {v}" for k, v in self.headers.items()]
        return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + self.body


def random_code() -> str:
    """A voucher code shaped like RM's (random, so index inserts land anywhere, as in production)."""
    return secrets.token_hex(6).upper()


def snapshot_specs(count: int, mix: str) -> list[tuple[str, str, int]]:
    """(code, status, step) for ``count`` distinct snapshots.

    new:       every callback is a new voucher (VALID): the insert path only.
    lifecycle: each voucher goes VALID -> ISSUE -> REDEEMED (one new insert, two updates of an
               existing row, three events), like real traffic.
    """
    specs: list[tuple[str, str, int]] = []
    if mix == "new":
        return [(random_code(), "VALID", 0) for _ in range(count)]
    if mix != "lifecycle":
        raise ValueError(f"unknown mix {mix!r}")
    while len(specs) < count:
        codes = [random_code() for _ in range(BLOCK)]
        for step, status in enumerate(LIFECYCLE):
            specs.extend((code, status, step) for code in codes)
    return specs[:count]


_signer: Signer | None = None


def _init_worker(private_pem: str) -> None:
    global _signer
    _signer = Signer(private_pem)


def _sign_chunk(specs: list[tuple[str, str, int]]) -> list[Record]:
    assert _signer is not None
    out = []
    for code, status, step in specs:
        body = callback_body(voucher_item(code, status, step))
        # Content-Type plus X-Signature, X-Nonce-Str (fresh) and X-Timestamp (now).
        out.append(Record("POST", CALLBACK_PATH, _signer.headers(body), body))
    return out


def signed_records(count: int, mix: str = "lifecycle", processes: int | None = None) -> list[Record]:
    """``count`` distinct signed callbacks, signed in parallel."""
    specs = snapshot_specs(count, mix)
    processes = processes or os.cpu_count() or 1
    chunk = max(1, -(-len(specs) // (processes * 4)))
    chunks = [specs[i:i + chunk] for i in range(0, len(specs), chunk)]
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(processes, initializer=_init_worker, initargs=(VECTORS["rm_server_private_pem"],)) as pool:
        parts = pool.map(_sign_chunk, chunks)
    return [record for part in parts for record in part]


def write_request_file(path: Path, records: list[Record]) -> None:
    """The file format scripts/bench/requests.lua reads."""
    with open(path, "wb") as f:
        for r in records:
            assert "\n" not in r.path and all("\n" not in k + v for k, v in r.headers.items())
            f.write(f"{r.method} {r.path} {len(r.headers)} {len(r.body)}\n".encode("latin-1"))
            for name, value in r.headers.items():
                f.write(f"{name}: {value}\n".encode("latin-1"))
            f.write(r.body + b"\n")
