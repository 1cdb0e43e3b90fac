"""The Stamps.co.id redemption API client: token auth, timeouts, safe retries only, typed errors.

Every Stamps redemption endpoint changes state and Stamps offers no idempotency key and no way to
look a redemption up, so nothing here re-sends a request that may have reached Stamps: a timeout
after sending, a dropped connection, a 5xx or an unreadable 200 raise ``StampsAmbiguous``. Only a
request that surely never left (connection refused, connect timeout) is retried, with backoff.

Errors are mapped from the documented status codes and Stamps' error body
``{"detail", "errors", "error_code", "error_message"}``; the token never appears in one.
"""

from __future__ import annotations

import json
import random
import re
import time
from typing import Any, Callable

import urllib3

from .client import HTTPResult, NetworkError, http_send
from .config import Settings

SERVER_ERRORS = frozenset({500, 502, 503, 504})
_ATTEMPTS_LEFT = re.compile(r"(\d+)\s+attempt\(s\)\s+left", re.I)

# The paths of the seed (docs: /work/shared/seeds/stamps-redemption-api.txt), relative to STAMPS_API_BASE_URL.
PATHS = {
    "redeem_reward": "/api/v2/redemptions/redeem-reward",
    "redeem_voucher": "/api/v2/redemptions/redeem-voucher",
    "deduct_value": "/api/vouchers/deduct-value",
    "by_voucher_code": "/api/redemptions/by-voucher-code",
    "promo_code": "/api/v3/redemptions/redeem-promo-code",
    "cancel": "/api/redemptions/cancel",
    "authorize": "/api/redemptions/authorize",
    "redeem_many": "/api/v2/redemptions/redeem-multiple-rewards",
}


class StampsError(Exception):
    """Stamps refused or failed a request.

    ``code`` is Stamps' ``error_code`` (or ``HTTP_<status>`` when it gave none), ``message`` its
    ``error_message`` or ``detail``, ``errors`` its per-field messages (always strings).
    """

    def __init__(
        self,
        code: str,
        message: str = "",
        http_status: int | None = None,
        errors: dict[str, str] | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message
        self.http_status = http_status
        self.errors = errors or {}

    def describe(self) -> str:
        """One line for people: status, code, message, field errors."""
        head = f"HTTP {self.http_status} {self.code}" if self.http_status else self.code
        if self.message:
            head += f" - {self.message}"
        fields = "; ".join(f"{name}: {text}" for name, text in self.errors.items())
        if fields and fields not in self.message:
            head += f" ({fields})"
        return head


class StampsBadRequest(StampsError):
    """400: a missing or invalid parameter; ``errors`` names the fields."""


class StampsInvalidPin(StampsBadRequest):
    """400 ``invalid_pin`` from authorize; ``attempts_left`` as Stamps counted them (None if not said)."""

    def __init__(self, *args: Any, attempts_left: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.attempts_left = attempts_left


class StampsAuthError(StampsError):
    """401: the token is missing or wrong (check STAMPS_TOKEN_TYPE and STAMPS_TOKEN)."""


class StampsForbidden(StampsError):
    """403: the token may not do this."""


class StampsNotFound(StampsError):
    """404: e.g. no redemption with that id (cancel)."""


class StampsUnavailable(StampsError):
    """Stamps could not be reached, or failed a request that is safe to repeat, until the retries ran out."""


class StampsAmbiguous(StampsError):
    """The request may or may not have taken effect at Stamps (timeout after sending, 5xx): never re-sent blindly."""


class StampsNotConfigured(StampsError):
    """Calls to Stamps need STAMPS_TOKEN."""


def _text(value: Any) -> str:
    """Stamps' messages are strings, lists of strings (Django REST framework) or nested objects."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "; ".join(t for t in (_text(v) for v in value) if t)
    if isinstance(value, dict):
        return "; ".join(f"{k}: {_text(v)}" for k, v in value.items())
    return str(value)


def attempts_left(text: str) -> int | None:
    """'Invalid PIN, 2 attempt(s) left' -> 2."""
    match = _ATTEMPTS_LEFT.search(text or "")
    return int(match.group(1)) if match else None


def error_from_response(response: HTTPResult) -> StampsError:
    """Map a documented status code and Stamps' error body to a typed exception."""
    status = response.status_code
    try:
        body = response.json()
    except ValueError:
        body = None
    code, message, errors = f"HTTP_{status}", "", {}
    if isinstance(body, dict):
        code = str(body.get("error_code") or code)[:64]
        message = _text(body.get("error_message")) or _text(body.get("detail"))
        raw_errors = body.get("errors")
        if isinstance(raw_errors, dict):
            errors = {str(k): _text(v) for k, v in raw_errors.items()}
        elif raw_errors:
            errors = {"non_field_errors": _text(raw_errors)}
    args = (code, message[:2000], status, errors)
    if status == 400:
        if code == "invalid_pin" or ("pin" in errors and attempts_left(errors["pin"]) is not None):
            return StampsInvalidPin(*args, attempts_left=attempts_left(errors.get("pin") or message))
        return StampsBadRequest(*args)
    if status == 401:
        return StampsAuthError(*args)
    if status == 403:
        return StampsForbidden(*args)
    if status == 404:
        return StampsNotFound(*args)
    if status in SERVER_ERRORS or status >= 500:
        return StampsUnavailable(*args)
    return StampsError(*args)


class StampsClient:
    """One client per process; thread-safe (urllib3's pool). Sends ``Authorization: <token_type> <token>``."""

    def __init__(
        self,
        *,
        base_url: str,
        token_type: str,
        token: str,
        timeout: tuple[float, float] = (5.0, 15.0),
        max_retries: int = 2,
        backoff_base: float = 0.2,
        backoff_max: float = 4.0,
        pool_size: int = 8,
        on_request: Callable[[str, str], None] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._authorization = f"{token_type} {token}"
        self._token = token
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self._on_request = on_request
        self.http = urllib3.PoolManager(num_pools=2, maxsize=max(pool_size, 2))
        self._timeout = urllib3.Timeout(connect=timeout[0], read=timeout[1])

    def __repr__(self) -> str:
        return f"StampsClient({self.base_url!r})"

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> "StampsClient":
        """Build from validated settings; raise StampsNotConfigured without STAMPS_TOKEN."""
        if not settings.stamps_configured:
            raise StampsNotConfigured("NOT_CONFIGURED", "set STAMPS_TOKEN (and STAMPS_TOKEN_TYPE) to call Stamps")
        options: dict[str, Any] = dict(
            base_url=settings.stamps_api_base_url,
            token_type=settings.stamps_token_type,
            token=settings.stamps_token,
            timeout=(min(5.0, settings.stamps_timeout_seconds), settings.stamps_timeout_seconds),
            max_retries=settings.stamps_max_retries,
        )
        options.update(overrides)
        return cls(**options)

    def close(self) -> None:
        """Release pooled connections."""
        self.http.clear()

    # -- requests -----------------------------------------------------------------------------

    def _send(self, url: str, body: bytes, endpoint: str) -> HTTPResult:
        headers = {
            "Authorization": self._authorization, "Content-Type": "application/json", "Accept": "application/json",
        }
        return http_send(
            self.http, "POST", url, headers=headers, body=body, timeout=self._timeout,
            note=lambda result: self._note(endpoint, result),
        )

    def _note(self, endpoint: str, result: str) -> None:
        if self._on_request is not None:
            self._on_request(endpoint, result)

    def _backoff(self, attempt: int) -> float:
        return min(self.backoff_max, self.backoff_base * (2**attempt)) * random.uniform(0.5, 1.0)

    def post(self, endpoint: str, body: dict[str, Any], *, safe_to_repeat: bool = False) -> dict[str, Any]:
        """POST ``body`` (None values dropped) to one of PATHS and return Stamps' JSON object.

        Retries, with backoff, only what is safe: a request that never left, and (if
        ``safe_to_repeat``) network errors and 5xx. Otherwise a possible effect raises StampsAmbiguous.
        """
        url = self.base_url + PATHS[endpoint]
        data = json.dumps({k: v for k, v in body.items() if v is not None}, separators=(",", ":")).encode("utf-8")
        attempt = 0
        while True:
            try:
                response = self._send(url, data, endpoint)
            except NetworkError as exc:
                if not exc.never_sent and not safe_to_repeat:
                    raise StampsAmbiguous("NO_ANSWER", f"no answer from Stamps ({exc.kind})") from None
                if attempt >= self.max_retries:
                    raise StampsUnavailable("NETWORK_ERROR", f"Stamps could not be reached ({exc.kind})") from None
            else:
                if response.status_code < 400:
                    return self._json(response, safe_to_repeat)
                error = self._scrubbed(error_from_response(response))
                if not isinstance(error, StampsUnavailable):
                    raise error
                if not safe_to_repeat:
                    raise StampsAmbiguous(
                        error.code, error.message or "Stamps failed mid-request", error.http_status, error.errors
                    )
                if attempt >= self.max_retries:
                    raise error
            time.sleep(self._backoff(attempt))
            attempt += 1

    def _scrubbed(self, error: StampsError) -> StampsError:
        """Stamps' own words go into errors, logs and the database: never with the token in them."""
        if self._token and len(self._token) >= 4:
            error.message = error.message.replace(self._token, "[redacted]")
            error.errors = {k: v.replace(self._token, "[redacted]") for k, v in error.errors.items()}
            error.args = (f"{error.code}: {error.message}" if error.message else error.code,)
        return error

    @staticmethod
    def _json(response: HTTPResult, safe_to_repeat: bool) -> dict[str, Any]:
        try:
            payload = response.json()
        except ValueError:
            payload = None
        if isinstance(payload, dict):
            return payload
        # Stamps said it worked, but what it did cannot be read: for a redemption that is not a failure.
        kind = StampsError if safe_to_repeat else StampsAmbiguous
        raise kind("BAD_RESPONSE", "Stamps answered 2xx with a body that is not a JSON object", response.status_code)

    # -- endpoints (parameters named as in Stamps' documentation) -----------------------------

    def redeem_reward(
        self, *, user: str, reward: int, store: int, invoice_number: str | None = None, channel: int | None = None,
        stamps: int | None = None, qty: int | None = None, extra_data: dict | None = None,
        request_id: str | None = None,
    ) -> dict[str, Any]:
        """Adding Reward Redemption."""
        return self.post("redeem_reward", dict(
            user=user, reward=reward, store=store, invoice_number=invoice_number, channel=channel, stamps=stamps,
            qty=qty, extra_data=extra_data, request_id=request_id,
        ))

    def redeem_voucher(
        self, *, user: str, voucher: int, store: int, invoice_number: str | None = None, channel: int | None = None,
        extra_data: dict | None = None, request_id: str | None = None,
    ) -> dict[str, Any]:
        """Adding Voucher Redemption."""
        return self.post("redeem_voucher", dict(
            user=user, voucher=voucher, store=store, invoice_number=invoice_number, channel=channel,
            extra_data=extra_data, request_id=request_id,
        ))

    def deduct_voucher_value(
        self, *, user: str, voucher: int, store: int, value: int, invoice_number: str | None = None,
        channel: int | None = None, extra_data: dict | None = None, request_id: str | None = None,
    ) -> dict[str, Any]:
        """Deduct Voucher Value (a voucher with a dynamic value)."""
        return self.post("deduct_value", dict(
            user=user, voucher=voucher, store=store, value=value, invoice_number=invoice_number, channel=channel,
            extra_data=extra_data, request_id=request_id,
        ))

    def redeem_by_voucher_code(
        self, *, user: str, voucher_code: str, voucher_template: int, store: int, invoice_number: str | None = None,
        channel: int | None = None, request_id: str | None = None,
    ) -> dict[str, Any]:
        """Adding Redemption by Voucher Code.

        The seed's JSON example names the member ``identifier`` and its cURL example ``user``: both are sent.
        """
        return self.post("by_voucher_code", dict(
            identifier=user, user=user, voucher_code=voucher_code, voucher_template=voucher_template, store=store,
            invoice_number=invoice_number, channel=channel, request_id=request_id,
        ))

    def redeem_promo_code(
        self, *, user: str, promo_code: str, store: int, invoice_number: str, channel: int | None = None,
        request_id: str | None = None,
    ) -> dict[str, Any]:
        """Adding Promo Code Redemption (invoice_number is required here)."""
        return self.post("promo_code", dict(
            user=user, promo_code=promo_code, store=store, invoice_number=invoice_number, channel=channel,
            request_id=request_id,
        ))

    def cancel_redemption(self, redemption_id: int, *, create_replacement_voucher: bool = False) -> dict[str, Any]:
        """Canceling a Redemption, optionally with a replacement voucher."""
        body: dict[str, Any] = {"id": redemption_id}
        if create_replacement_voucher:
            body["create_replacement_voucher"] = True
        return self.post("cancel", body)

    def authorize(self, *, user: str, pin: str, request_id: str, timeout: int) -> dict[str, Any]:
        """Authorize Redemption with the member's PIN, for ``timeout`` seconds; StampsInvalidPin says attempts left."""
        return self.post("authorize", dict(user=user, pin=pin, request_id=request_id, timeout=timeout))

    def redeem_multiple_rewards(
        self, *, user: str, rewards: list[dict[str, Any]], store: int, invoice_number: str | None = None,
        channel: int | None = None,
    ) -> dict[str, Any]:
        """Multiple Reward Redemption: ``rewards`` items carry code, qty, stamps and request_id."""
        return self.post("redeem_many", dict(
            user=user, rewards=rewards, store=store, invoice_number=invoice_number, channel=channel,
        ))
