"""Helpers for the benchmark scripts under scripts/ (servers, load generators, throwaway databases)."""

import signal
import sys


def stop_cleanly_on_sigterm() -> None:
    """SIGTERM (timeout(1), a cancelled job) unwinds like Ctrl-C: servers stopped, throwaway databases dropped.

    Without it the interpreter dies at once, and the gunicorn servers (own sessions) and the
    PostgreSQL databases a benchmark made outlive it.
    """
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
