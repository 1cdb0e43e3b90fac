"""Test helpers that are plain code (fixtures live in conftest.py)."""

from __future__ import annotations

import json
import os
import queue
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import requests
from alembic import command
from alembic.config import Config

from receiver.signature import load_private_key, sign_request

ROOT = Path(__file__).resolve().parent.parent
CALLBACK_PATH = "/webhooks/revenuemonster/voucher"


def alembic_config(url: str) -> Config:
    """Alembic config for the project's migrations, pointed at ``url``."""
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    config.attributes["configure_logging"] = False
    return config


def migrate(url: str, revision: str = "head") -> None:
    """alembic upgrade, in-process."""
    command.upgrade(alembic_config(url), revision)


def fresh_settings_env(url: str, vectors: dict, tmp_path: Path, **extra: str) -> dict[str, str]:
    """A complete environment for the app, trusting the test RM server key from a file."""
    key_file = tmp_path / "rm-server-public.pem"
    key_file.write_text(vectors["rm_server_public_pem"], encoding="utf-8")
    env = {
        "DATABASE_URL": url,
        "RM_SERVER_PUBLIC_KEY_FILE": str(key_file),
        "RM_SIGNATURE_MAX_AGE_SECONDS": "900",
        "SQLITE_BUSY_TIMEOUT_SECONDS": "5",
        "LOG_LEVEL": "WARNING",
        # Where gunicorn_server runs and logs: outside the checkout, one folder per test.
        "TEST_LOG_DIR": str(tmp_path),
    }
    env.update(extra)
    return env


class Signer:
    """Signs callback bodies with a private key, with a fresh nonce and timestamp each time."""

    def __init__(self, private_pem: str) -> None:
        self.key = load_private_key(private_pem)

    def headers(self, body: bytes | str, *, timestamp: int | None = None, nonce: str | None = None) -> dict[str, str]:
        """Content-Type plus RM's three signature headers for a callback body."""
        signed = sign_request(self.key, method="post", body=body, nonce=nonce, timestamp=timestamp)
        return {"Content-Type": "application/json", **signed.as_dict()}


def rm_time(at: datetime) -> str:
    """Format a time the way RM does (RFC 3339, UTC, nanoseconds when present)."""
    return at.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f") + "123Z"


BASE_TIME = datetime(2026, 1, 1, tzinfo=timezone.utc)


def voucher_item(code: str, status: str, step: int = 0, **overrides: Any) -> dict[str, Any]:
    """An RM voucher object whose updatedAt advances one second per ``step``."""
    item = {
        "key": f"key-{code}",
        "label": "Free coffee",
        "voucherBatchKey": "batch-1",
        "type": "CASH",
        "amount": 500,
        "discountRate": 0,
        "minimumSpendAmount": 1000,
        "origin": "SYSTEM",
        "imageUrl": "",
        "memberProfile": None,
        "assignedAt": "0001-01-01T00:00:00Z",
        "payload": None,
        "qrUrl": f"http://api.revenuemonster.my/qr/1/voucher/{code}",
        "code": code,
        "isShipping": False,
        "address": None,
        "expiry": {"type": "FIXED", "day": 0, "expiredAt": "2027-01-01T00:00:00Z"},
        "usedAt": "0001-01-01T00:00:00Z",
        "redeemedAt": "0001-01-01T00:00:00Z",
        "isDeviceRedeem": False,
        "status": status,
        "createdAt": "2025-12-31T00:00:00Z",
        "updatedAt": rm_time(BASE_TIME + timedelta(seconds=step)),
    }
    item.update(overrides)
    return item


def callback_body(item: dict[str, Any], envelope: str = "item") -> bytes:
    """A callback body in one of RM's two envelopes."""
    if envelope == "item":
        doc = {"item": item, "code": "SUCCESS"}
    else:
        doc = {"data": item, "eventType": "VOUCHER_STATUS"}
    return json.dumps(doc).encode("utf-8")


def verified_callback(code: str, status: str, step: int, nonce: str | None = None, body: bytes | None = None):  # noqa: ANN201
    """(IncomingCallback, VoucherSnapshot) of a callback as the view hands it over once verified."""
    import secrets

    from receiver.deliveries import IncomingCallback
    from receiver.snapshot import snapshot_from_item, voucher_item_from_envelope

    body = body or callback_body(voucher_item(code, status, step))
    incoming = IncomingCallback(
        body=body,
        headers={"Content-Type": "application/json", "X-Nonce-Str": nonce or secrets.token_hex(16)},
        remote_addr="127.0.0.1",
        content_type="application/json",
    )
    return incoming, snapshot_from_item(voucher_item_from_envelope(json.loads(body)))


def free_port() -> int:
    """An unused TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    """Wait until ``url`` answers, or fail (early if ``proc`` died)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            requests.get(url, timeout=2)
            return
        except requests.RequestException:  # refused while starting, or slow on a busy machine
            time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


def process_running(pid: int) -> bool:
    """Whether ``pid`` still runs: an exited orphan stays a zombie until init reaps it, which may take a second."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def child_environ(env: dict[str, str]) -> dict[str, str]:
    """This process's environment without the app's own variables (a developer's RM_*, DATABASE_URL), then ``env``."""
    child = {k: v for k, v in os.environ.items() if not k.startswith(("RM_", "DATABASE_URL", "OPS_"))}
    child.update(env)
    return child


class Gunicorn:
    """The real web process (`gunicorn "receiver:create_app()"`, production settings) under a test's control.

    It runs outside the checkout so a developer's own .env never leaks into a test.
    """

    def __init__(self, env: dict[str, str], *, workers: int = 4, port: int | None = None) -> None:
        self.env = child_environ(env)
        self.env["PYTHONPATH"] = str(ROOT)
        self.env["WEB_CONCURRENCY"] = str(workers)
        self.port = port or free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(env["TEST_LOG_DIR"]) / f"gunicorn-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Gunicorn":
        """Start the master and wait until it answers."""
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps writing to it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "receiver:create_app()", "-c", str(ROOT / "gunicorn.conf.py"),
             "--bind", f"127.0.0.1:{self.port}"],
            cwd=str(self.log_path.parent), env=self.env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        wait_http(self.base + "/healthz", proc=self.proc)
        return self

    def worker_pids(self) -> list[int]:
        """The master's live children."""
        assert self.proc is not None
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def kill_master(self) -> float:
        """kill -9 the master, wait for its orphaned workers to exit (they hold the port); the seconds they took."""
        assert self.proc is not None
        orphans = self.worker_pids()
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        started = time.monotonic()
        while time.monotonic() - started < 30 and any(process_running(pid) for pid in orphans):
            time.sleep(0.01)
        exited_after = time.monotonic() - started
        for pid in orphans:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return exited_after

    def stop(self) -> None:
        """SIGTERM the whole group; SIGKILL if it lingers."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def log_tail(self, chars: int = 5000) -> str:
        """The end of the server's log, for failure messages."""
        return self.log_path.read_text(errors="replace")[-chars:]


@contextmanager
def gunicorn_server(env: dict[str, str], *, workers: int = 4) -> Iterator[str]:
    """Run the real web process and yield its base URL."""
    server = Gunicorn(env, workers=workers)
    try:
        server.start()
        yield server.base
    except BaseException:
        sys.stderr.write(server.log_tail())
        raise
    finally:
        server.stop()


@contextmanager
def counting_commits(engine: Any) -> Iterator[list[object]]:
    """The engine's commits while the block runs, one entry each (SQLAlchemy's "commit" event)."""
    from sqlalchemy import event

    commits: list[object] = []
    listener = commits.append
    event.listen(engine, "commit", listener)
    try:
        yield commits
    finally:
        event.remove(engine, "commit", listener)


def terminate_backends(admin_url: str, url: str) -> int:
    """End every server process connected to ``url``'s database, as a PostgreSQL restart would; how many."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            # The timeout makes each call wait until that process has exited, so clients find it gone.
            return len(conn.execute(
                text("SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity "
                     "WHERE datname = :db AND pid <> pg_backend_pid()"),
                {"db": make_url(url).database},
            ).all())
    finally:
        admin.dispose()


class TcpProxy:
    """A loopback TCP proxy that a test can cut and restore, to take a database away mid-run.

    ``delay``: seconds every answer from the target is held back, so that each time a client
    waits for the database costs it that long (a far-away database, to count round trips by).
    """

    def __init__(self, target_host: str, target_port: int, delay: float = 0.0) -> None:
        self.target = (target_host, target_port)
        self.delay = delay
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(128)
        self.port = self.listener.getsockname()[1]
        self.open = True
        # stall(): everything sent either way is swallowed, and nothing comes back.
        self.stalled = False
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.open:
                client.close()
                continue
            if self.stalled:
                # A hung server still takes connections (the kernel does), and answers nothing.
                with self._lock:
                    self._conns.append(client)
                threading.Thread(target=self._swallow, args=(client,), daemon=True).start()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            for end in (client, upstream):
                # As libpq does: with Nagle's algorithm a second small write waited for the ACK of
                # the first, up to the peer's 40 ms delayed ACK, on top of the ``delay``.
                end.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._conns += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        answers: queue.Queue = queue.Queue()
        if self.delay:
            threading.Thread(target=self._answer_late, args=(answers, a), daemon=True).start()
        try:
            while True:
                ready, _, _ = select.select([a, b], [], [], 1.0)
                for src in ready:
                    data = src.recv(65536)
                    if not data:
                        return
                    if self.stalled:
                        continue
                    if src is b and self.delay:
                        answers.put((time.monotonic() + self.delay, data))
                    else:
                        (b if src is a else a).sendall(data)
        except (OSError, ValueError):  # ValueError: cut() closed a socket while select() waited on it
            return
        finally:
            answers.put(None)
            a.close()
            b.close()

    def _answer_late(self, answers: queue.Queue, client: socket.socket) -> None:
        # Each answer leaves ``delay`` after it arrived, in order: latency, not a slower link.
        while (item := answers.get()) is not None:
            due, data = item
            time.sleep(max(0.0, due - time.monotonic()))
            try:
                client.sendall(data)
            except OSError:
                return

    def cut(self) -> None:
        """Refuse new connections and kill the live ones: the database is gone."""
        self.open = False
        with self._lock:
            for conn in self._conns:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                conn.close()
            self._conns.clear()

    def _swallow(self, client: socket.socket) -> None:
        try:
            while client.recv(65536):
                pass
        except OSError:
            pass
        finally:
            client.close()

    def stall(self) -> None:
        """Keep every connection open but let nothing through, either way: a server that hangs."""
        self.stalled = True

    def restore(self) -> None:
        """Accept and forward connections again (connections that were stalled are closed: their streams lost bytes)."""
        if self.stalled:
            self.cut()
            self.stalled = False
        self.open = True

    def close(self) -> None:
        """Stop the proxy."""
        self._stop = True
        self.cut()
        self.listener.close()


def while_another_writer_has_the_turn(database_path: str, work: Callable[[], Any], rows: Callable[[], int]) -> tuple[bool, int, list]:
    """Run ``work`` on a thread while another descriptor of the SQLite writer-turn lock file holds the turn.

    Returns whether ``work`` was still waiting after 0.5 s, what ``rows()`` counted at that moment,
    and ``[work's result]`` once the turn was given up and the thread finished (within 10 s).
    """
    from receiver.db import WriterTurn

    results: list = []
    # What a web worker holds while it writes a callback, as another process would hold it.
    holder = WriterTurn(f"{database_path}-writer.lock", timeout=5)
    with holder.hold():
        worker = threading.Thread(target=lambda: results.append(work()))
        worker.start()
        worker.join(0.5)
        waited = worker.is_alive()
        counted = rows()
    worker.join(10)
    return waited, counted, results
