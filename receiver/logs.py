"""Logging: text or JSON lines, a request id on every line of a request, and secrets scrubbed."""

from __future__ import annotations

import json
import logging
import random
import re
import sys
from datetime import datetime, timezone

from flask import g, has_request_context

_PEM = re.compile(r"-----BEGIN [A-Z ]+-----.*?-----END [A-Z ]+-----", re.S)
_SIGNATURE = re.compile(r"(sha256 )[A-Za-z0-9+/=]{16,}")
_AUTH = re.compile(r"\b(Bearer|Basic) [A-Za-z0-9._~+/=-]{8,}")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_FIELDS = ("request_id", "voucher_code", "delivery_id")


class ContextFilter(logging.Filter):
    """Stamp each record with the current request id (and blanks for fields a line did not set)."""

    def filter(self, record: logging.LogRecord) -> bool:  # noqa: D102
        if not getattr(record, "request_id", None):
            record.request_id = current_request_id()
        for name in ("voucher_code", "delivery_id"):
            if not hasattr(record, name):
                setattr(record, name, None)
        return True


class RedactFilter(logging.Filter):
    """Last line of defence: no key, token, credential or full signature leaves in a log line."""

    def __init__(self, secrets: list[str] | None = None) -> None:
        super().__init__()
        self.secrets = [s for s in (secrets or []) if s and len(s) >= 4]

    def scrub(self, text: str) -> str:
        """Replace anything secret-shaped or known-secret in ``text``."""
        # Each pattern starts with a fixed word; looking for it first is far cheaper than the regex
        # on the typical line, which has none of them.
        if "-----BEGIN " in text:
            text = _PEM.sub("[redacted key]", text)
        if "sha256 " in text:
            text = _SIGNATURE.sub(r"\1[redacted]", text)
        if "Bearer " in text or "Basic " in text:
            text = _AUTH.sub(r"\1 [redacted]", text)
        for secret in self.secrets:
            text = text.replace(secret, "[redacted]")
        return text

    def filter(self, record: logging.LogRecord) -> bool:  # noqa: D102
        message = record.getMessage()
        clean = self.scrub(message)
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.scrub(record.exc_text)
        if clean != message or record.args:
            record.msg, record.args = clean, None
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers (LOG_FORMAT=json)."""

    def format(self, record: logging.LogRecord) -> str:  # noqa: D102
        entry = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in _FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.exc_info or record.exc_text:
            entry["exception"] = record.exc_text or self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


def configure(level: str = "INFO", fmt: str = "text", secrets: list[str] | None = None) -> None:
    """Install one stderr handler on the root logger (replacing ours from an earlier call)."""
    # Per record, the logging module walks the stack for the caller's file, line and function
    # and looks up the thread and multiprocessing names: no format here (ours or gunicorn's) prints
    # them, and they were a fifth of the cost of the line every callback logs. The process id stays
    # (gunicorn's lines print it). These switches are the logging module's own ("Optimization").
    logging.logThreads = False
    logging.logMultiprocessing = False
    logging._srcfile = None  # type: ignore[attr-defined]
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_rmvs", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler._rmvs = True  # type: ignore[attr-defined]
    handler.addFilter(ContextFilter())
    handler.addFilter(RedactFilter(secrets))
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root.addHandler(handler)
    root.setLevel(level)


def current_request_id() -> str | None:
    """The id of the request being handled, if any."""
    if has_request_context():
        return g.get("request_id")
    return None


def new_request_id(incoming: str | None) -> str:
    """Keep a caller's well-formed X-Request-Id (a proxy's), else make one."""
    if incoming and _REQUEST_ID.match(incoming):
        return incoming
    # 32 random hex digits, as uuid4().hex gave, without a system call on every request: an id
    # must be unique, not secret. The random module reseeds itself in every forked worker.
    return f"{random.getrandbits(128):032x}"
