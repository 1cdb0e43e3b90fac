"""A fake RevenueMonster: a real HTTP server that behaves like RM for tests, the demo and benchmarks.

It issues OAuth2 tokens (Basic credentials), checks bearer tokens and request signatures against the
merchant public key, serves the voucher, batch, redeem, void and chop-stamp endpoints with RM's
shapes and error codes, injects latency, 429s, 5xx and timeouts, and pushes signed callbacks to a
receiver on RM's retry schedule with optional loss, duplication and reordering.

Run it alone: ``python -m receiver.fake_rm --port 9100 --vouchers 100`` (prints its keys' paths).
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import logging
import random
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from http import HTTPStatus
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric import rsa
from flask import Flask, Response, jsonify, request
from waitress import wasyncore
from waitress.server import create_server

from .signature import SignatureError, load_private_key, load_public_key, sign_request, verify_signed

FINAL = {"VOID", "EXPIRED", "MARKET_PLACE", "COMPLETE"}
ZERO_TIME = "0001-01-01T00:00:00Z"


def rm_time(at: datetime) -> str:
    """RM's time format: RFC 3339 UTC with nanoseconds."""
    return at.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f") + "000Z"


def serve_in_thread(app: Flask, host: str, port: int, threads: int, name: str):  # noqa: ANN201
    """Serve a fake's app with waitress (HTTP/1.1 keep-alive) in a daemon thread; (server, base URL)."""
    # Answers delayed past shutdown make waitress log socket errors; the fake's own log is what matters.
    logging.getLogger("waitress").setLevel(logging.CRITICAL)
    server = create_server(app, host=host, port=port, threads=threads, channel_timeout=30)
    _guard_trigger(server.trigger)
    server.loop_thread = threading.Thread(target=server.run, name=name, daemon=True)
    server.loop_thread.start()
    return server, f"http://{host}:{server.effective_port}"


def stop_serving(server) -> None:  # noqa: ANN001
    """Stop a server from serve_in_thread: let answers in progress finish (up to 5 s), then close its sockets."""
    server.task_dispatcher.shutdown(timeout=5)

    def close_everything() -> None:
        # Run by the loop's own thread, so no select() of its is left waiting on a closed descriptor.
        wasyncore.close_all(server._map)

    server.trigger.pull_trigger(close_everything)
    server.loop_thread.join(5)
    if server.loop_thread.is_alive():  # the loop is stuck: close from here after all
        with server.trigger.lock:
            wasyncore.close_all(server._map)


def _guard_trigger(trigger) -> None:  # noqa: ANN001
    """Make waitress's wake-up pipe safe to close while task threads may still pull it.

    A task thread that finishes an answer after close() writes b"x" to the pipe's old descriptor
    number, which the process may by then have reused, e.g. for a PostgreSQL connection (seen as
    "invalid frontend message type 120" in the tests). Pulls and the close now share the
    trigger's lock, and a pull after the close writes nothing.
    """
    pull = trigger._physical_pull

    def guarded_pull() -> None:
        with trigger.lock:
            if not trigger._closed:
                pull()

    trigger._physical_pull = guarded_pull


def run_until_interrupted(shutdown: Callable[[], None]) -> None:
    """Keep a fake serving in the foreground until Ctrl-C, then stop it (``python -m`` entry points)."""
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        shutdown()


def voucher_object(code: str, status: str, updated: datetime, *, batch_key: str, label: str) -> dict[str, Any]:
    """A voucher in RM's shape (the callback sample on RM's voucher overview page), updated at ``updated``."""
    return {
        "key": f"key-{code}",
        "label": label,
        "redemptionRuleKey": None,
        "voucherBatchKey": batch_key,
        "type": "GIFT",
        "amount": 0,
        "discountRate": 0,
        "minimumSpendAmount": 0,
        "origin": "SYSTEM",
        "imageUrl": "",
        "memberProfile": None,
        "redemptionRule": None,
        "assignedAt": ZERO_TIME,
        "payload": None,
        "qrUrl": f"http://api.revenuemonster.my/qr/0/voucher/{code}",
        "code": code,
        "isShipping": False,
        "address": None,
        "expiry": {"type": "FIXED", "day": 0, "expiredAt": rm_time(updated + timedelta(days=90))},
        "usedAt": rm_time(updated) if status == "VOID" else ZERO_TIME,
        "redeemedAt": ZERO_TIME,
        "isDeviceRedeem": False,
        "status": status,
        "voucherComboKey": None,
        "isMarketPlace": False,
        "createdAt": rm_time(updated),
        "updatedAt": rm_time(updated),
    }


def _error_document(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def rm_error(code: str, message: str, status: int) -> tuple[Response, int]:
    """RM's error shape."""
    return jsonify(_error_document(code, message)), status


_VOUCHER_PREFIX = "/v3/voucher/"
# The request headers the token and signature checks read, and their WSGI environ keys.
_AUTH_HEADERS = [(name, "HTTP_" + name.upper().replace("-", "_"))
                 for name in ("Authorization", "X-Signature", "X-Nonce-Str", "X-Timestamp")]


@dataclass
class Faults:
    """What the fake does to API requests (not to token requests unless ``include_token``)."""

    latency: float = 0.0
    rate_429: float = 0.0
    rate_5xx: float = 0.0
    rate_timeout: float = 0.0
    timeout_sleep: float = 3.0
    # Apply the next N state changes, then answer only after ``timeout_sleep`` (a lost response).
    drop_after_apply: int = 0
    # Answer the next N API requests with this status before doing anything (deterministic failures).
    fail_next: int = 0
    fail_status: int = 503


@dataclass
class LoggedRequest:
    """One API request as the fake saw it."""

    method: str
    path: str
    endpoint: str
    code: str | None
    status: int
    started: float
    finished: float


def _post(url: str, body: bytes, headers: Mapping[str, str], *, timeout: float) -> int | None:
    """POST once and return the status, or None when the receiver could not be reached or answer.

    Plain http.client rather than requests, whose per-call session costs CPU that the fake takes
    from the server it pushes to (in the convergence test 1.1 ms a callback instead of 2.1 ms).
    """
    parts = urlsplit(url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request("POST", path, body=body, headers=dict(headers))
        response = conn.getresponse()
        response.read()
        return response.status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


@dataclass
class CallbackPlan:
    """How callbacks reach the receiver: RM tries 5 times, ``interval`` apart, until it gets a 200."""

    loss: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    attempts: int = 5
    interval: float = 60.0
    reorder_window: int = 20


class FakeRM:
    """State and behaviour of the fake; ``serve()`` puts it on a real HTTP port."""

    def __init__(
        self,
        *,
        merchant_public_pem: str,
        server_private_pem: str,
        client_id: str = "fake-client",
        client_secret: str = "fake-secret",
        token_ttl: float = 7200.0,
        max_skew: float = 120.0,
        seed: int = 0,
    ) -> None:
        self.merchant_key: rsa.RSAPublicKey = load_public_key(merchant_public_pem)
        self.server_key: rsa.RSAPrivateKey = load_private_key(server_private_pem)
        self.client_id = client_id
        self.client_secret = client_secret
        self.token_ttl = token_ttl
        self.max_skew = max_skew
        self.rng = random.Random(seed)
        self.vouchers: dict[str, dict[str, Any]] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.cards: dict[str, dict[str, Any]] = {}
        self.tokens: dict[str, float] = {}
        self.refresh_tokens: dict[str, str] = {}
        self.token_requests = 0
        self.faults = Faults()
        self.log: list[LoggedRequest] = []
        self.callbacks_sent = 0
        self.page_size = 100
        # Snapshots of changes made through the API, for tests to deliver as RM's callbacks.
        self.outbox: list[dict[str, Any]] = []
        self.stamps_per_card = 10
        # RM's clock starts at the real time so expiry dates and "stale after" windows behave as in production.
        self.clock = datetime.now(timezone.utc).replace(microsecond=0)
        self.lock = threading.RLock()
        self.base_url = ""
        self.app = self._build_app()
        self._server = None

    # -- state --------------------------------------------------------------------------------

    def tick(self) -> datetime:
        """RM's clock: strictly increasing, so every change has a newer updatedAt."""
        with self.lock:
            self.clock += timedelta(milliseconds=1, microseconds=self.rng.randint(0, 999))
            return self.clock

    def add_batch(self, key: str, label: str = "Batch") -> dict[str, Any]:
        """Create a voucher batch."""
        with self.lock:
            batch = {"key": key, "label": label, "codes": []}
            self.batches[key] = batch
            return batch

    def add_voucher(self, code: str, *, batch_key: str = "batch-1", status: str = "VALID", **fields: Any) -> dict:
        """Create a voucher in RM's shape."""
        with self.lock:
            if batch_key not in self.batches:
                self.add_batch(batch_key, f"Batch {batch_key}")
            now = self.tick()
            item = voucher_object(code, status, now, batch_key=batch_key, label=fields.pop("label", "Free gift"))
            item.update(fields)
            self.vouchers[code] = item
            self.batches[batch_key]["codes"].append(code)
            return dict(item)

    def set_status(self, code: str, status: str, **fields: Any) -> dict[str, Any]:
        """Change a voucher as RM would (new updatedAt); return the new snapshot."""
        with self.lock:
            item = self.vouchers[code]
            now = self.tick()
            item["status"] = status
            if status == "ISSUE" and item["assignedAt"] == ZERO_TIME:
                item["assignedAt"] = rm_time(now)
            if status == "REDEEMED":
                item["redeemedAt"] = rm_time(now)
            if status == "VOID":
                item["usedAt"] = rm_time(now)
            item.update(fields)
            item["updatedAt"] = rm_time(now)
            return json.loads(json.dumps(item))

    def remove_voucher(self, code: str) -> None:
        """RM forgets a voucher (Get Voucher By Code then answers VOUCHER_NOT_FOUND)."""
        with self.lock:
            self.vouchers.pop(code, None)

    def expire_tokens(self) -> None:
        """Make every issued access token invalid, as after RM rotates them."""
        with self.lock:
            self.tokens = {t: 0.0 for t in self.tokens}

    def requests_for(self, endpoint: str) -> list[LoggedRequest]:
        """Logged API requests of one kind."""
        with self.lock:
            return [r for r in self.log if r.endpoint == endpoint]

    def create_vouchers(self, count: int, *, prefix: str = "V", batches: int = 4) -> list[str]:
        """Create ``count`` VALID vouchers spread over ``batches`` batches; return their codes."""
        codes = [f"{prefix}{i:06d}" for i in range(count)]
        for i, code in enumerate(codes):
            self.add_voucher(code, batch_key=f"batch-{i % batches}")
        return codes

    def live(self, codes: Iterable[str]) -> list[dict[str, Any]]:
        """Walk each voucher through a random life from VALID; return every change's snapshot, in RM's order."""
        paths = [
            [],
            ["ISSUE"],
            ["ISSUE", "REDEEMED"],
            ["ISSUE", "VOID"],
            ["ISSUE", "REDEEMED", "VOID"],
            ["ISSUE", "REDEEMED", "EXPIRED"],
            ["ISSUE", "EXPIRED"],
            ["MARKET_PLACE"],
            ["ISSUE", "ISSUE"],
        ]
        lives = {code: list(self.rng.choice(paths)) for code in codes}
        changes: list[dict[str, Any]] = []
        # Interleave vouchers, as real traffic does: one step of a random voucher at a time.
        active = [code for code, path in lives.items() if path]
        while active:
            code = self.rng.choice(active)
            status = lives[code].pop(0)
            changes.append(self.set_status(code, status, label=f"Free gift ({status.lower()})"))
            if not lives[code]:
                active.remove(code)
        return changes

    # -- callbacks ----------------------------------------------------------------------------

    def callback_body(self, item: dict[str, Any]) -> bytes:
        """The callback envelope from RM's voucher overview page."""
        return json.dumps({"item": item, "code": "SUCCESS"}).encode("utf-8")

    def post_callback(self, url: str, item: dict[str, Any], plan: CallbackPlan) -> int | None:
        """Deliver one callback on RM's schedule: up to ``plan.attempts`` tries until HTTP 200."""
        body = self.callback_body(item)
        status = None
        for attempt in range(plan.attempts):
            signed = sign_request(self.server_key, method="post", body=body)
            headers = {"Content-Type": "application/json", **signed.as_dict()}
            status = _post(url, body, headers, timeout=10)
            with self.lock:
                self.callbacks_sent += 1
            if status == 200:
                return status
            if attempt + 1 < plan.attempts:
                time.sleep(plan.interval)
        return status

    def plan_deliveries(self, snapshots: Iterable[dict[str, Any]], plan: CallbackPlan) -> list[dict[str, Any]]:
        """Apply loss, duplication and reordering to a stream of snapshots (the callbacks RM would push)."""
        out: list[dict[str, Any]] = []
        for snap in snapshots:
            if self.rng.random() < plan.loss:
                continue
            out.append(snap)
            if self.rng.random() < plan.duplicate:
                out.append(snap)
        for i in range(len(out)):
            if self.rng.random() < plan.reorder:
                j = min(len(out) - 1, i + self.rng.randint(1, plan.reorder_window))
                out[i], out[j] = out[j], out[i]
        return out

    def deliver(self, url: str, snapshots: list[dict[str, Any]], plan: CallbackPlan, *, workers: int = 8) -> list[int | None]:
        """Send planned callbacks with ``workers`` in flight, each on RM's retry schedule."""
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(lambda s: self.post_callback(url, s, plan), snapshots))

    # -- HTTP ---------------------------------------------------------------------------------

    def _auth_error(
        self, headers: Mapping[str, str], *, method: str, body: bytes, raw_uri: str
    ) -> tuple[str, str, int] | None:
        """What RM would refuse about a request's token and signature: (code, message, status), or None."""
        header = headers.get("Authorization", "")
        if not header.startswith("Bearer "):
            return "UNAUTHORIZED", "missing bearer token", 401
        expires = self.tokens.get(header[7:])
        if expires is None or expires < time.time():
            return "INVALID_ACCESS_TOKEN", "access token is invalid or expired", 401
        if not all(headers.get(h) for h in ("X-Signature", "X-Nonce-Str", "X-Timestamp")):
            return "INVALID_REQUEST_SIGNATURE", "X-Signature, X-Nonce-Str and X-Timestamp are required", 400
        timestamp = headers.get("X-Timestamp", "")
        if not timestamp.isdigit() or abs(time.time() - int(timestamp)) > self.max_skew:
            return "INVALID_TIMESTAMP", "X-Timestamp is too far from RM's clock", 400
        try:
            verify_signed(
                self.merchant_key,
                body=body,
                method=method,
                signature=headers.get("X-Signature"),
                nonce=headers.get("X-Nonce-Str"),
                timestamp=timestamp,
                request_url=self.base_url + raw_uri,
            )
        except SignatureError:
            return "INVALID_REQUEST_SIGNATURE", "request signature is invalid", 400
        return None

    def _check_auth(self) -> tuple[Response, int] | None:
        raw_uri = request.environ.get("REQUEST_URI") or request.environ.get("RAW_URI") or request.full_path
        refused = self._auth_error(request.headers, method=request.method, body=request.get_data(), raw_uri=raw_uri)
        return rm_error(*refused) if refused else None

    def _lookup_fast_path(self, environ: dict[str, Any], start_response: Any) -> list[bytes] | None:
        """Get Voucher By Code (GET) without Flask: the benchmarks' hot request, same checks, log and answers.

        Flask's request machinery is over half of the fake's CPU per lookup, and the fake shares the
        machine's cores with the client it measures. Other requests (POST lookups, void, a body)
        are left to the Flask app.
        """
        path = environ.get("PATH_INFO", "")
        if (
            environ.get("REQUEST_METHOD") != "GET"
            or not path.startswith(_VOUCHER_PREFIX)
            or path.endswith("/void")
            or environ.get("CONTENT_LENGTH") not in (None, "", "0")
        ):
            return None
        code = path[len(_VOUCHER_PREFIX):]
        entry = LoggedRequest("GET", path, "get_voucher", code, 0, time.monotonic(), 0.0)
        with self.lock:
            self.log.append(entry)
        headers = {name: environ.get(key, "") for name, key in _AUTH_HEADERS}
        raw_uri = environ.get("REQUEST_URI") or environ.get("RAW_URI") or path
        refused = self._auth_error(headers, method="GET", body=b"", raw_uri=raw_uri) or self._fault()
        if refused is None:
            body, status = self._lookup_answer(code)
        else:
            body, status = json.dumps(_error_document(refused[0], refused[1])), refused[2]
        data = body.encode()
        start_response(f"{status} {HTTPStatus(status).phrase}",
                       [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
        entry.status, entry.finished = status, time.monotonic()
        return [data]

    def _lookup_answer(self, code: str) -> tuple[str, int]:
        """Get Voucher By Code's JSON answer and status: the voucher, or VOUCHER_NOT_FOUND."""
        with self.lock:
            item = self.vouchers.get(code)
            if item is not None:
                return json.dumps({"item": item, "code": "SUCCESS"}), 200
        return json.dumps(_error_document("VOUCHER_NOT_FOUND", f"voucher {code} not found")), 404

    def _fault(self) -> tuple[str, str, int] | None:
        """The injected latency, and the failure to answer instead, if any: (code, message, status)."""
        f = self.faults
        with self.lock:
            forced = f.fail_next > 0
            if forced:
                f.fail_next -= 1
        if forced:
            return "INTERNAL_SERVER_ERROR", "forced failure", f.fail_status
        if f.latency:
            time.sleep(f.latency)
        roll = self.rng.random()
        if roll < f.rate_429:
            return "TOO_MANY_REQUESTS", "rate limit exceeded", 429
        if roll < f.rate_429 + f.rate_5xx:
            return "INTERNAL_SERVER_ERROR", "something went wrong", self.rng.choice([500, 502, 503])
        if roll < f.rate_429 + f.rate_5xx + f.rate_timeout:
            time.sleep(f.timeout_sleep)
            return "GATEWAY_TIMEOUT", "upstream timed out", 504
        return None

    def _inject_faults(self) -> tuple[Response, int] | None:
        refused = self._fault()
        return rm_error(*refused) if refused else None

    def _build_app(self) -> Flask:
        app = Flask("fake_rm")
        fake = self

        @app.before_request
        def _start() -> None:
            request.environ["fake_rm.started"] = time.monotonic()

        @app.after_request
        def _log(response: Response) -> Response:
            entry = request.environ.get("fake_rm.entry")
            if entry is not None:
                entry.status, entry.finished = response.status_code, time.monotonic()
            return response

        @app.post("/v1/token")
        def token() -> Any:
            entry = LoggedRequest("POST", "/v1/token", "token", None, 0, request.environ["fake_rm.started"], 0.0)
            request.environ["fake_rm.entry"] = entry
            with fake.lock:
                fake.log.append(entry)
            header = request.headers.get("Authorization", "")
            expected = base64.b64encode(f"{fake.client_id}:{fake.client_secret}".encode()).decode()
            if header != f"Basic {expected}":
                return rm_error("INVALID_CLIENT", "client credentials are invalid", 401)
            body = request.get_json(silent=True) or {}
            with fake.lock:
                fake.token_requests += 1
                if body.get("grantType") == "refresh_token":
                    if body.get("refreshToken") not in fake.refresh_tokens:
                        return rm_error("INVALID_REFRESH_TOKEN", "refresh token is invalid", 400)
                elif body.get("grantType") != "client_credentials":
                    return rm_error("INVALID_GRANT_TYPE", "grantType must be client_credentials", 400)
                access = secrets.token_urlsafe(24)
                refresh = secrets.token_urlsafe(24)
                fake.tokens[access] = time.time() + fake.token_ttl
                fake.refresh_tokens[refresh] = access
            return jsonify(
                {"accessToken": access, "tokenType": "Bearer", "expiresIn": int(fake.token_ttl), "refreshToken": refresh}
            )

        def guarded(endpoint: str, code: str | None = None) -> tuple[Response, int] | None:
            # Logged on arrival (status 0 until answered), so a request whose answer is delayed still counts.
            entry = LoggedRequest(request.method, request.path, endpoint, code, 0,
                                  request.environ["fake_rm.started"], 0.0)
            request.environ["fake_rm.entry"] = entry
            with fake.lock:
                fake.log.append(entry)
            return fake._check_auth() or fake._inject_faults()

        @app.route("/v3/voucher/<path:rest>", methods=["GET", "POST"])
        def voucher(rest: str) -> Any:
            if request.method == "POST" and rest.endswith("/void"):
                return void(rest[: -len("/void")])
            refused = guarded("get_voucher", rest)
            if refused:
                return refused
            body, status = fake._lookup_answer(rest)
            return Response(body, status=status, mimetype="application/json")

        def void(code: str) -> Any:
            refused = guarded("void", code)
            if refused:
                return refused
            with fake.lock:
                item = fake.vouchers.get(code)
                if item is None:
                    return rm_error("VOUCHER_NOT_FOUND", f"voucher {code} not found", 404)
                if item["status"] in FINAL:
                    return rm_error("VOUCHER_ALREADY_USED", f"voucher is {item['status']}", 400)
                body = request.get_json(silent=True) or {}
                snap = fake.set_status(code, "VOID", **({"usedAt": body["usedAt"]} if body.get("usedAt") else {}))
            return fake._answer({"item": snap, "code": "SUCCESS"})

        @app.post("/v3/loyalty/me/voucher/<path:code>/redeem")
        def redeem(code: str) -> Any:
            refused = guarded("redeem", code)
            if refused:
                return refused
            if not request.args.get("countryCode", "").isdigit() or not request.args.get("phoneNumber", "").isdigit():
                return rm_error("INVALID_REQUEST", "countryCode and phoneNumber are required", 400)
            with fake.lock:
                item = fake.vouchers.get(code)
                if item is None:
                    return rm_error("VOUCHER_NOT_FOUND", f"voucher {code} not found", 404)
                if item["status"] not in ("VALID", "ISSUE"):
                    return rm_error("VOUCHER_ALREADY_REDEEMED", f"voucher is {item['status']}", 400)
                profile = {"countryCode": request.args["countryCode"], "phoneNumber": request.args["phoneNumber"]}
                snap = fake.set_status(code, "REDEEMED", memberProfile=profile)
            return fake._answer({"item": snap, "code": "SUCCESS"})

        @app.post("/v3/voucher-batch/<path:key>/issue")
        def issue(key: str) -> Any:
            refused = guarded("issue", key)
            if refused:
                return refused
            with fake.lock:
                batch = fake.batches.get(key)
                if batch is None:
                    return rm_error("VOUCHER_BATCH_NOT_FOUND", f"voucher batch {key} not found", 404)
                code = next((c for c in batch["codes"] if fake.vouchers.get(c, {}).get("status") == "VALID"), None)
                if code is None:
                    return rm_error("VOUCHER_BATCH_EMPTY", "no VALID voucher left in this batch", 400)
                snap = fake.set_status(code, "ISSUE")
            return fake._answer({"item": snap, "code": "SUCCESS"})

        @app.post("/v3/loyalty/chop-stamp/card/scan")
        def chop_stamp() -> Any:
            refused = guarded("chop_stamp")
            if refused:
                return refused
            code = (request.get_json(silent=True) or {}).get("code", "")
            card_key, _, uuid = code.partition(":")
            if not card_key or not uuid:
                return rm_error("INVALID_REQUEST", "code must be <card key>:<uuid>", 400)
            with fake.lock:
                card = fake.cards.setdefault(
                    card_key,
                    {"id": str(1583401221690518310 + len(fake.cards)), "key": card_key, "noOfChoppedStamp": 0,
                     "isCompleted": False, "target": fake.stamps_per_card,
                     "startAt": rm_time(fake.clock), "endAt": rm_time(fake.clock + timedelta(days=365)),
                     "createdAt": rm_time(fake.clock), "seen": set()},
                )
                if uuid in card["seen"]:
                    return rm_error("STAMP_ALREADY_CHOPPED", "this QR code was already scanned", 400)
                if card["isCompleted"]:
                    return rm_error("CARD_COMPLETED", "this card is already completed", 400)
                card["seen"].add(uuid)
                card["noOfChoppedStamp"] += 1
                card["isCompleted"] = card["noOfChoppedStamp"] >= card["target"]
                card["updatedAt"] = rm_time(fake.tick())
                item = {k: v for k, v in card.items() if k not in ("seen", "target")}
            return fake._answer({"item": item, "code": "SUCCESS"})

        @app.get("/v3/voucher-batches")
        def batches() -> Any:
            refused = guarded("voucher_batches")
            if refused:
                return refused
            with fake.lock:
                keys = sorted(fake.batches)
                items = [{"key": k, "label": fake.batches[k]["label"], "quantity": len(fake.batches[k]["codes"])}
                         for k in keys]
            return jsonify({"items": items, "code": "SUCCESS", "meta": {}})

        @app.get("/v3/voucher-batch/<path:key>")
        def batch(key: str) -> Any:
            refused = guarded("voucher_batch", key)
            if refused:
                return refused
            with fake.lock:
                found = fake.batches.get(key)
                if found is None:
                    return rm_error("VOUCHER_BATCH_NOT_FOUND", f"voucher batch {key} not found", 404)
                start = int(request.args.get("cursor") or 0)
                codes = found["codes"][start : start + fake.page_size]
                items = [json.loads(json.dumps(fake.vouchers[c])) for c in codes if c in fake.vouchers]
                more = start + fake.page_size < len(found["codes"])
            meta = {"cursor": str(start + fake.page_size)} if more else {}
            return jsonify({"items": items, "code": "SUCCESS", "meta": meta})

        @app.get("/_fake/requests")
        def fake_requests() -> Any:
            with fake.lock:
                return jsonify([r.__dict__ for r in fake.log])

        @app.post("/_fake/faults")
        def fake_faults() -> Any:
            with fake.lock:
                for name, value in (request.get_json(silent=True) or {}).items():
                    if hasattr(fake.faults, name):
                        setattr(fake.faults, name, type(getattr(fake.faults, name))(value))
                return jsonify(fake.faults.__dict__)

        @app.post("/_fake/vouchers")
        def fake_seed() -> Any:
            body = request.get_json(silent=True) or {}
            count, prefix = int(body.get("count", 0)), body.get("prefix", "V")
            status, batches = body.get("status", "VALID"), int(body.get("batches", 1))
            for i in range(count):
                fake.add_voucher(f"{prefix}{i:06d}", batch_key=f"batch-{i % batches}", status=status)
            return jsonify({"vouchers": len(fake.vouchers)})

        @app.get("/_fake/vouchers")
        def fake_dump() -> Any:
            with fake.lock:
                return jsonify({c: {"status": v["status"], "updatedAt": v["updatedAt"]} for c, v in fake.vouchers.items()})

        @app.post("/_fake/simulate")
        def fake_simulate() -> Any:
            """Every VALID voucher lives a random life; push its callbacks (lossy, duplicated, reordered)."""
            body = request.get_json(silent=True) or {}
            plan = CallbackPlan(
                loss=float(body.get("loss", 0.25)),
                duplicate=float(body.get("duplicate", 0.1)),
                reorder=float(body.get("reorder", 0.2)),
                attempts=int(body.get("attempts", 5)),
                interval=float(body.get("interval", 0.2)),
            )
            with fake.lock:
                codes = [code for code, item in fake.vouchers.items() if item["status"] == "VALID"]
            changes = fake.live(codes)
            planned = fake.plan_deliveries(changes, plan)
            statuses = fake.deliver(body["callback_url"], planned, plan, workers=int(body.get("workers", 6)))
            return jsonify({
                "vouchers": len(codes), "changes": len(changes), "callbacks_planned": len(planned),
                "delivered_200": sum(1 for s in statuses if s == 200),
            })

        @app.post("/_fake/vouchers/<path:code>/status")
        def fake_set_status(code: str) -> Any:
            body = request.get_json(silent=True) or {}
            snap = fake.set_status(code, body["status"])
            url = body.get("callback_url")
            if url:
                plan = CallbackPlan(interval=float(body.get("interval", 60)))
                threading.Thread(target=fake.post_callback, args=(url, snap, plan), daemon=True).start()
            return jsonify({"item": snap})

        flask_wsgi = app.wsgi_app

        def wsgi(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
            fast = fake._lookup_fast_path(environ, start_response)
            return fast if fast is not None else flask_wsgi(environ, start_response)

        app.wsgi_app = wsgi  # type: ignore[method-assign]
        return app

    def _answer(self, payload: dict[str, Any]) -> Any:
        """Answer a state change, unless told to lose the response after applying it."""
        with self.lock:
            if "status" in payload["item"]:
                self.outbox.append(json.loads(json.dumps(payload["item"])))
            lose = self.faults.drop_after_apply > 0
            if lose:
                self.faults.drop_after_apply -= 1
        if lose:
            # The change is made; the answer arrives only after the client has given up waiting.
            time.sleep(self.faults.timeout_sleep)
        return jsonify(payload)

    # -- serving ------------------------------------------------------------------------------

    def serve(self, host: str = "127.0.0.1", port: int = 0, threads: int = 64) -> str:
        """Start serving in a background thread; return the base URL (used as both API and OAuth host).

        Waitress, not werkzeug's development server: it keeps HTTP/1.1 connections alive, as RM's
        servers do, and a new TCP connection per request would dominate every benchmark.
        """
        self._server, self.base_url = serve_in_thread(self.app, host, port, threads, "fake-rm")
        return self.base_url

    def shutdown(self) -> None:
        """Stop serving."""
        if self._server is not None:
            stop_serving(self._server)
            self._server = None


def main(argv: list[str] | None = None) -> None:
    """Run the fake RM on its own (demo, benchmarks), with freshly generated keys written to --keys-dir."""
    from .devmode import write_key_pair

    parser = argparse.ArgumentParser(prog="python -m receiver.fake_rm")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--keys-dir", default="instance/fake-rm")
    parser.add_argument("--vouchers", type=int, default=0, help="create this many ISSUE vouchers V000000...")
    parser.add_argument("--latency-ms", type=float, default=0.0)
    args = parser.parse_args(argv)
    keys = Path(args.keys_dir)
    merchant_private, merchant_public = write_key_pair(keys, "merchant")
    server_private, server_public = write_key_pair(keys, "rm-server")
    fake = FakeRM(merchant_public_pem=merchant_public.read_text(), server_private_pem=server_private.read_text())
    fake.faults.latency = args.latency_ms / 1000
    for i in range(args.vouchers):
        fake.add_voucher(f"V{i:06d}", status="ISSUE")
    base = fake.serve(args.host, args.port)
    print(f"fake RM listening on {base} (client id {fake.client_id!r}, secret {fake.client_secret!r})", flush=True)
    print(f"  RM_API_BASE_URL={base} RM_OAUTH_BASE_URL={base}", flush=True)
    print(f"  RM_PRIVATE_KEY_FILE={merchant_private} RM_SERVER_PUBLIC_KEY_FILE={server_public}", flush=True)
    run_until_interrupted(fake.shutdown)


if __name__ == "__main__":
    main()
