"""Run a WSGI app under the real gunicorn with the project's production settings (gunicorn.conf.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.support import free_port, wait_http

ROOT = Path(__file__).resolve().parents[2]
PROJECT_APP = "receiver:create_app()"
HELLO_APP = "bench.baseline_apps:create_hello_app()"
MINIMAL_APP = "bench.baseline_apps:create_minimal_app()"


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (gunicorn workers of a master)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode("latin-1")
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if int(fields[1]) == pid:
            out.append(int(entry))
    return sorted(out)


class GunicornServer:
    """`python -m gunicorn APP -c <repo>/gunicorn.conf.py --bind 127.0.0.1:PORT`, run outside the checkout.

    The environment is the caller's minus RM_*, DATABASE_URL, OPS_*, WEB_CONCURRENCY (as
    tests.support.gunicorn_server does, so a developer's .env never leaks in), plus ``env``.
    """

    def __init__(self, app: str, env: dict[str, str], workdir: Path, label: str, code: Path = ROOT) -> None:
        """``code``: the checkout whose receiver/ and gunicorn.conf.py to run (default: this one)."""
        self.app = app
        self.code = code
        self.env = env
        self.workdir = workdir
        self.label = label
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.log_path = workdir / f"gunicorn-{label}-{self.port}.log"

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "GunicornServer":
        full_env = {
            k: v for k, v in os.environ.items()
            if not k.startswith(("RM_", "DATABASE_URL", "OPS_", "WEB_CONCURRENCY", "PROMETHEUS_MULTIPROC_DIR"))
        }
        full_env.update(self.env)
        full_env["PYTHONPATH"] = os.pathsep.join([str(self.code), str(ROOT / "scripts")])
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", self.app, "-c", str(self.code / "gunicorn.conf.py"),
             "--bind", f"127.0.0.1:{self.port}"],
            cwd=str(self.workdir), env=full_env, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_http(self.base + "/healthz", proc=self.proc, timeout=60)
            # All workers booted (each answers /healthz only after importing the app).
            deadline = time.monotonic() + 30
            expected = int(self.env.get("WEB_CONCURRENCY") or 0)
            while expected and len(self.workers()) < expected and time.monotonic() < deadline:
                time.sleep(0.1)
        except BaseException:
            self.__exit__(None, None, None)
            sys.stderr.write(self.log_path.read_text(errors="replace")[-4000:])
            raise
        return self

    def workers(self) -> list[int]:
        assert self.proc is not None
        return children(self.proc.pid)

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=25)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()

    def log_tail(self, lines: int = 20) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def log_errors(self) -> list[str]:
        """Log lines that look like trouble (the project logs one INFO line per callback)."""
        bad = ("ERROR", "CRITICAL", "Traceback", "WORKER TIMEOUT", "database is locked")
        return [line for line in self.log_path.read_text(errors="replace").splitlines() if any(b in line for b in bad)]
