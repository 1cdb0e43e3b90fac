"""Helpers for the benchmark scripts under scripts/ (servers, load generators, throwaway databases)."""

import os
import signal
import sys


def stop_cleanly_on_sigterm() -> None:
    """SIGTERM (timeout(1), a cancelled job) unwinds like Ctrl-C: servers stopped, throwaway databases dropped.

    Without it the interpreter dies at once, and the gunicorn servers (own sessions) and the
    PostgreSQL databases a benchmark made outlive it. Processes forked from this one (the
    multiprocessing pools that sign requests) get the default back as they start: Pool.terminate()
    SIGTERMs its workers and waits for them, and a worker running this handler instead could hang
    that wait (1 run in 6, tried).
    """
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    os.register_at_fork(after_in_child=lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL))
