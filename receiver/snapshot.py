"""Parse RM voucher JSON (callback envelopes and API responses) into typed snapshots."""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Mapping

from .state_machine import normalise_status

_ZERO_TIME_PREFIX = "0001-01-01"
_TIME_RE = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(Z|z|[+-]\d{2}:?\d{2})?$", re.ASCII
)
# Integer columns: BIGINT for money, INTEGER for small counts (PostgreSQL enforces both).
_BIGINT = 2**63 - 1
_INT = 2**31 - 1
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


# Built once: json.dumps with options builds a new encoder on every call.
_SORTED_JSON = json.JSONEncoder(sort_keys=True, ensure_ascii=False).encode
_COMPACT_SORTED_JSON = json.JSONEncoder(sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode


class SnapshotError(ValueError):
    """The payload is not a usable RM voucher."""


@dataclass(frozen=True)
class RMTime:
    """An RM timestamp: UTC datetime (microseconds) plus exact nanoseconds since the epoch for ordering."""

    at: datetime
    ns: int


def parse_rm_time(value: Any, field_name: str = "time") -> RMTime | None:
    """Parse RM's RFC 3339 times with nanoseconds and offsets; zero time and empty mean None."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise SnapshotError(f"{field_name} must be a string time, got {type(value).__name__}")
    if value.startswith(_ZERO_TIME_PREFIX):
        return None
    try:
        return _parse_time_text(value)
    except _BadTime as exc:
        raise SnapshotError(f"{field_name} {exc.args[0]}: {value[:40]!r}") from exc.__cause__


class _BadTime(Exception):
    pass


# Every snapshot carries several times, and most repeat across callbacks (a batch's expiry, a
# voucher's createdAt): parsing one costs ~8 us, a cache hit well under 1 us. RMTime is immutable.
@functools.lru_cache(maxsize=4096)
def _parse_time_text(value: str) -> RMTime:
    m = _TIME_RE.match(value.strip())
    if not m:
        raise _BadTime("is not an RFC 3339 time")
    year, month, day, hour, minute, second, frac, offset = m.groups()
    frac9 = (frac or "").ljust(9, "0")
    try:
        tz = timezone.utc
        if offset and offset not in ("Z", "z"):
            sign = -1 if offset[0] == "-" else 1
            digits = offset[1:].replace(":", "")
            tz = timezone(sign * timedelta(hours=int(digits[:2]), minutes=int(digits[2:])))
        local = datetime(int(year), int(month), int(day), int(hour), int(minute), int(second), tzinfo=tz)
        utc = local.astimezone(timezone.utc)
    except (ValueError, OverflowError) as exc:
        # Out-of-range fields, offsets beyond 24 h, or a time that leaves the calendar in UTC.
        raise _BadTime("is not a valid time") from exc
    whole = utc - _EPOCH
    ns = (whole.days * 86400 + whole.seconds) * 1_000_000_000 + int(frac9)
    return RMTime(at=utc.replace(microsecond=int(frac9[:6])), ns=ns)


def _opt_str(item: Mapping[str, Any], key: str, limit: int = 255) -> str | None:
    value = item.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        value = _SORTED_JSON(value)
    # PostgreSQL text cannot hold NUL; keep the rest of the text (the raw JSON keeps it escaped).
    return value.replace("\x00", "\ufffd")[:limit]


def _opt_int(item: Mapping[str, Any], key: str, bound: int = _BIGINT) -> int | None:
    value = item.get(key)
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise SnapshotError(f"{key} must be a number")
    if isinstance(value, float) and not math.isfinite(value):
        raise SnapshotError(f"{key} must be a finite number")
    if isinstance(value, (int, float)):
        number = int(value)
    elif isinstance(value, str) and value.isascii() and value.lstrip("-").isdigit():
        number = int(value)
    else:
        raise SnapshotError(f"{key} must be a number")
    if not -bound - 1 <= number <= bound:
        raise SnapshotError(f"{key} is out of range")
    return number


def _opt_bool(item: Mapping[str, Any], key: str) -> bool | None:
    value = item.get(key)
    if value is None:
        return None
    if isinstance(value, bool):
        return value
    raise SnapshotError(f"{key} must be true or false")


def _opt_json(item: Mapping[str, Any], key: str) -> str | None:
    value = item.get(key)
    if value is None or value == "" or value == {}:
        return None
    return _COMPACT_SORTED_JSON(value)


@dataclass(frozen=True)
class VoucherSnapshot:
    """One observation of a voucher as RM described it."""

    code: str
    status: str
    raw_status: str
    updated: RMTime | None
    fingerprint: str
    raw: str
    fields: dict[str, Any] = field(compare=False)

    @property
    def rm_updated_at(self) -> datetime | None:
        """RM's updatedAt in UTC, microseconds."""
        return self.updated.at if self.updated else None

    @property
    def rm_updated_ns(self) -> int | None:
        """RM's updatedAt in exact nanoseconds since the epoch."""
        return self.updated.ns if self.updated else None


def snapshot_from_item(item: Any) -> VoucherSnapshot:
    """Build a snapshot from RM's voucher object; raise SnapshotError when it is unusable."""
    if not isinstance(item, Mapping):
        raise SnapshotError("voucher object must be a JSON object")
    code = item.get("code")
    if not isinstance(code, str) or not code.strip():
        raise SnapshotError("voucher object has no code")
    if len(code) > 128:
        raise SnapshotError("voucher code is longer than 128 characters")
    if not code.isprintable():
        raise SnapshotError("voucher code contains control characters")
    raw_status = item.get("status")
    if not isinstance(raw_status, str) or not raw_status.strip():
        raise SnapshotError("voucher object has no status")
    status = normalise_status(raw_status)
    # Checked after upper-casing: "ß" becomes "SS".
    if len(status) > 32 or not status.isprintable():
        raise SnapshotError("voucher status is longer than 32 characters or not printable")
    expiry = item.get("expiry")
    if expiry is not None and not isinstance(expiry, Mapping):
        raise SnapshotError("expiry must be an object")
    expiry = expiry or {}
    # The docs name the fixed expiry time both expiredAt and expiryAt.
    expires = parse_rm_time(expiry.get("expiredAt") or expiry.get("expiryAt"), "expiry.expiredAt")

    def t(key: str) -> datetime | None:
        parsed = parse_rm_time(item.get(key), key)
        return parsed.at if parsed else None

    fields: dict[str, Any] = {
        "key": _opt_str(item, "key"),
        "batch_key": _opt_str(item, "voucherBatchKey"),
        "label": _opt_str(item, "label", 500),
        "voucher_type": _opt_str(item, "type", 32),
        "amount": _opt_int(item, "amount"),
        "discount_rate": _opt_int(item, "discountRate", _INT),
        "minimum_spend_amount": _opt_int(item, "minimumSpendAmount"),
        "origin": _opt_str(item, "origin", 32),
        "image_url": _opt_str(item, "imageUrl", 1000),
        "qr_url": _opt_str(item, "qrUrl", 1000),
        "is_shipping": _opt_bool(item, "isShipping"),
        "address": _opt_json(item, "address"),
        "member_profile": _opt_json(item, "memberProfile"),
        "is_device_redeem": _opt_bool(item, "isDeviceRedeem"),
        "is_market_place": _opt_bool(item, "isMarketPlace"),
        "voucher_combo_key": _opt_str(item, "voucherComboKey"),
        "expiry_type": _opt_str(expiry, "type", 32),
        "expiry_day": _opt_int(expiry, "day", _INT),
        "expires_at": expires.at if expires else None,
        "assigned_at": t("assignedAt"),
        "redeemed_at": t("redeemedAt"),
        "used_at": t("usedAt"),
        "rm_created_at": t("createdAt"),
    }
    updated = parse_rm_time(item.get("updatedAt"), "updatedAt")
    if updated is not None and not -_BIGINT <= updated.ns <= _BIGINT:
        # Stored exactly as nanoseconds (vouchers.rm_updated_ns, BIGINT): 1677 to 2262 fit.
        raise SnapshotError(f"updatedAt is out of range: {item['updatedAt'][:40]!r}")
    raw = _COMPACT_SORTED_JSON(item)
    try:
        fingerprint = hashlib.sha256(raw.encode("utf-8")).hexdigest()
    except UnicodeEncodeError:
        raise SnapshotError("voucher object contains invalid unicode (a lone surrogate)") from None
    return VoucherSnapshot(
        code=code.strip(),
        status=status,
        raw_status=raw_status,
        updated=updated,
        fingerprint=fingerprint,
        raw=raw,
        fields=fields,
    )


def voucher_item_from_envelope(document: Any) -> Any:
    """Find the voucher object in either RM envelope: {"item": ...} or {"data": ..., "eventType": ...}."""
    if not isinstance(document, Mapping):
        raise SnapshotError("body must be a JSON object")
    for key in ("item", "data"):
        if key in document:
            inner = document[key]
            # Payment-notify style envelopes sometimes nest the voucher one level further down.
            if isinstance(inner, Mapping) and "code" not in inner and isinstance(inner.get("voucher"), Mapping):
                return inner["voucher"]
            return inner
    raise SnapshotError('body has no voucher object ("item" or "data")')
