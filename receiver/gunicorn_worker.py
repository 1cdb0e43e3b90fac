"""A gunicorn worker whose threads take turns accepting connections and each serve their own.

gunicorn's threaded worker (gthread) accepts every connection on its main thread, registers it
with a poller and hands it to a thread pool through a future, then finishes it on the main
thread again: several GIL hand-overs and a few hundred microseconds of Python per request
(measured: 1.201 against 1.038 ms of worker CPU per callback, docs/performance.md). Here each of
``threads`` threads runs the sync worker's loop: wait for a connection, accept, parse, call the
app, answer, close. The main thread keeps the heartbeat that tells the master this process is
alive, and waits for shutdown; on SIGTERM the requests in hand finish (graceful_timeout).

One thread of a process waits for a connection at a time (the others queue on a lock): a new
connection then wakes one thread per process, and the process that gets to accept it first is
one whose threads are not all busy holding its GIL, as with sync workers. A process with every
thread busy accepts nothing, where gthread kept accepting into its queue. Requests are served
one per connection (no keep-alive), as gunicorn.conf.py sets.

A thread waits at most WEB_CLIENT_TIMEOUT_SECONDS for a client's next bytes (the request, its
body, room to write the answer), then drops the connection. Without that bound a connection that
sends nothing held its thread for ever (the main thread's heartbeat kept the master from
restarting the worker, as it would a sync worker's), and 3 x 8 idle connections, which a client
that vanished or anyone can leave open, stopped the service answering at all.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
import threading
import time

from gunicorn import util
from gunicorn.workers.sync import SyncWorker

from .config import web_client_timeout_seconds

# How often a waiting thread looks up to see whether the worker is shutting down.
_POLL_SECONDS = 0.5


class AcceptingThreadsWorker(SyncWorker):
    """``threads`` threads per process, each running the sync worker's accept-and-serve loop."""

    def run(self) -> None:
        """Serve until told to stop, then let the requests in hand finish (up to graceful_timeout)."""
        for listener in self.sockets:
            listener.setblocking(False)
        self._client_timeout = web_client_timeout_seconds()
        seconds, fraction = divmod(self._client_timeout, 1.0)
        self._timeval = struct.pack("ll", int(seconds), int(fraction * 1_000_000))
        self._accept_turn = threading.Lock()
        threads = [
            threading.Thread(target=self._serve, name=f"http-{index}", daemon=True)
            for index in range(max(1, self.cfg.threads))
        ]
        for thread in threads:
            thread.start()
        while self.alive and self.is_parent_alive():
            self.notify()
            # Signals (SIGTERM: stop) write to the wakeup pipe, so this returns at once for them.
            ready, _, _ = select.select([self.PIPE[0]], [], [], 1.0)
            if ready:
                os.read(self.PIPE[0], 64)
        self.alive = False
        deadline = time.monotonic() + self.cfg.graceful_timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _serve(self) -> None:
        try:
            while self.alive:
                # One thread of the process waits for a connection at a time; the others queue on
                # this lock (see the module docstring).
                if not self._accept_turn.acquire(timeout=_POLL_SECONDS):
                    continue
                try:
                    accepted = self._accept_one()
                finally:
                    self._accept_turn.release()
                if accepted is None:
                    continue
                listener, client, addr = accepted
                if not self._sends_something(client, addr):
                    util.close(client)
                    continue
                # handle() answers every error of the request itself; only accept's reach here.
                self.handle(listener, client, addr)
        except Exception:
            # As a sync worker would, the process stops and the master starts a fresh one.
            self.log.exception("A serving thread failed; stopping this worker")
            self.alive = False
            os.write(self.PIPE[1], b".")

    def _sends_something(self, client: socket.socket, addr: tuple | None) -> bool:
        """Wait (up to the client timeout) for the request's first byte; False, quietly, for a connection that sends none.

        One that stops half-way through its request times out inside handle(), which logs it.
        """
        try:
            return bool(client.recv(1, socket.MSG_PEEK))
        except BlockingIOError:  # SO_RCVTIMEO ran out
            self.log.info("Closing a connection from %s that sent nothing for %g s", addr[0] if addr else "?", self._client_timeout)
        except OSError:
            pass  # reset before it sent anything
        return False

    def _accept_one(self) -> tuple | None:
        """A connection from a listening socket, or None after _POLL_SECONDS or when another process took it."""
        ready, _, _ = select.select(self.sockets, [], [], _POLL_SECONDS)
        for listener in ready:
            try:
                client, addr = listener.accept()
            except OSError as exc:
                # Another process took it first, or the client gave up.
                if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.ECONNABORTED):
                    continue
                raise
            client.setblocking(True)
            # Kernel timeouts, not settimeout(): that puts the socket in non-blocking mode and adds
            # a poll() before every recv and send (2 % fewer callbacks/s on PostgreSQL, measured).
            # A blocking call that waits this long fails with EAGAIN (BlockingIOError) instead.
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, self._timeval)
            client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, self._timeval)
            util.close_on_exec(client)
            return listener, client, addr
        return None
