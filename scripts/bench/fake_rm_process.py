"""The fake RM in a process of its own, and the settings that point the service's RM client at it."""

from __future__ import annotations

import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, NamedTuple

from tests.support import free_port, wait_http

ROOT = Path(__file__).resolve().parents[2]


class FakeRMProcess(NamedTuple):
    base: str
    pid: int


@contextmanager
def fake_rm_process(work: Path, vouchers: int) -> Iterator[FakeRMProcess]:
    """`python -m receiver.fake_rm` holding ``vouchers`` vouchers, its keys under ``work``/keys, until the block ends."""
    port = free_port()
    fake = subprocess.Popen(
        [sys.executable, "-m", "receiver.fake_rm", "--port", str(port), "--keys-dir", str(work / "keys"),
         "--vouchers", str(vouchers)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(base + "/_fake/requests", proc=fake, timeout=60)
        yield FakeRMProcess(base, fake.pid)
    finally:
        fake.terminate()
        fake.wait(timeout=10)


def rm_env(url: str, base: str, work: Path, concurrency: int) -> dict[str, str]:
    """Settings for a reconciling process: ``url``'s database, the fake RM at ``base``, ``concurrency`` at RM."""
    return {
        "DATABASE_URL": url, "RM_INSECURE_SKIP_SIGNATURE": "1", "RM_API_BASE_URL": base, "RM_OAUTH_BASE_URL": base,
        "RM_CLIENT_ID": "fake-client", "RM_CLIENT_SECRET": "fake-secret",
        "RM_PRIVATE_KEY_FILE": str(work / "keys" / "merchant-private.pem"), "RECONCILE_CONCURRENCY": str(concurrency),
        # The cap must not be what limits these measurements; production keeps its own.
        "RM_MAX_REQUESTS_PER_SECOND": "100000",
    }
