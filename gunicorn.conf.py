"""Production settings for `gunicorn "receiver:create_app()"` (gunicorn reads ./gunicorn.conf.py itself)."""

import multiprocessing
import os
import sys
import tempfile
from pathlib import Path

# .env first, so WEB_CONCURRENCY and friends from it apply here too (real environment variables win).
if Path(".env").is_file():
    from dotenv import load_dotenv

    load_dotenv(".env", override=False)

# A request waits at most SQLITE_BUSY_TIMEOUT_SECONDS (10 s) or the PostgreSQL pool/connect
# timeouts (5 s); the worker timeout must be longer so those become 503s, not killed workers.
timeout = int(os.environ.get("GUNICORN_TIMEOUT") or 30)

# Workers count metrics into files here so /metrics adds them all up (prometheus_client multiprocess).
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="rmvs-metrics-")
Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]).mkdir(parents=True, exist_ok=True)
for stale in Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]).glob("*.db"):
    stale.unlink()
graceful_timeout = 20
# No keep-alive: each response closes its connection, so every request is accepted afresh by
# whichever worker is free. With keep-alive a threaded worker keeps the connections it accepted
# for their lifetime, and a few long-lived ones (a proxy's, a load generator's) could all land on
# one worker: measured, 16 connections split 16/0/0 or 12/4/0 across 3 workers, one worker
# GIL-bound at 100% of a core while the others idled (PostgreSQL ingest 356 req/s against 650-800
# when they happened to spread). RM posts a callback at a time, minutes apart, so it gains nothing
# from keep-alive; a proxy in front may keep its client connections alive as it likes.
keepalive = 0

# Imported only now: importing the receiver package loads prometheus_client, which must already
# see PROMETHEUS_MULTIPROC_DIR, or every worker would count in its own memory.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from receiver.config import DEFAULT_WEB_THREADS, default_web_concurrency  # noqa: E402

workers = int(
    os.environ.get("WEB_CONCURRENCY")
    or default_web_concurrency(multiprocessing.cpu_count())
)
# Threaded workers (the default) answer several callbacks at once, and those that arrive together
# commit in one transaction (receiver/group_commit.py); WEB_THREADS=1 means sync workers, one
# request per process. The threads accept connections themselves (receiver/gunicorn_worker.py),
# which costs less per request than gunicorn's own threaded worker (gthread).
threads = int(os.environ.get("WEB_THREADS") or DEFAULT_WEB_THREADS)
worker_class = "receiver.gunicorn_worker.AcceptingThreadsWorker" if threads > 1 else "sync"


def on_starting(server):  # noqa: ANN001, ANN201
    """Validate configuration once, before any worker starts: one clear line, then exit."""
    from receiver.config import ConfigError, load_dotenv_if_present, load_settings

    load_dotenv_if_present()
    try:
        load_settings()
    except ConfigError as exc:
        sys.stderr.write(f"configuration error: {exc}\n")
        sys.stderr.flush()
        os._exit(2)


def post_fork(server, worker):  # noqa: ANN001, ANN201
    """Ask Linux to SIGTERM this worker when the master dies, so a killed master's workers stop at once."""
    # Without it, orphaned workers notice only when their poll times out (up to timeout/2 = 15 s for
    # an idle sync worker) and hold the port meanwhile, so a restarted master cannot bind it. SIGTERM
    # is gunicorn's graceful stop: requests in flight still finish and get their answer.
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != server.pid:  # the master died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)


def child_exit(server, worker):  # noqa: ANN001, ANN201
    """Fold a dead worker's live gauges out of the metrics."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def post_worker_init(worker):  # noqa: ANN001, ANN201
    """Freeze the loaded app's objects out of the garbage collector's full collections."""
    # A worker holds ~97,000 objects once the app is loaded, and each full (generation 2)
    # collection walked them all while holding the GIL: 45-130 ms with every thread of the worker
    # stopped. Under 1,000 forged callbacks/s (scripts/bench_abuse.py) a worker ran one every few
    # seconds, and those pauses were the genuine callbacks' worst latencies (151 ms where the p50
    # was 6 ms). Frozen, they are never scanned again and a full collection takes ~1 ms. The cost:
    # a start-up object that later becomes cyclic garbage is never freed (there are none to speak of).
    import gc

    gc.freeze()
