"""Parsing RM voucher objects: envelopes, statuses, times."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

from receiver.snapshot import SnapshotError, parse_rm_time, snapshot_from_item, voucher_item_from_envelope


def test_times_with_nanoseconds_offsets_and_zero() -> None:
    t = parse_rm_time("2018-09-28T17:19:44.686549977Z")
    assert t.at == datetime(2018, 9, 28, 17, 19, 44, 686549, tzinfo=timezone.utc)
    assert t.ns % 1_000_000_000 == 686549977
    offset = parse_rm_time("2020-11-25T13:58:55+08:00")
    assert offset.at == datetime(2020, 11, 25, 5, 58, 55, tzinfo=timezone.utc)
    assert parse_rm_time("2020-10-07T17:44:26.679908+08:00").at == datetime(
        2020, 10, 7, 9, 44, 26, 679908, tzinfo=timezone.utc
    )
    assert parse_rm_time("0001-01-01T00:00:00Z") is None
    assert parse_rm_time("") is None and parse_rm_time(None) is None
    # Nanoseconds order snapshots that a microsecond column cannot tell apart.
    a = parse_rm_time("2018-09-28T17:19:44.686549737Z")
    b = parse_rm_time("2018-09-28T17:19:44.686549977Z")
    assert a.at == b.at and a.ns < b.ns
    with pytest.raises(SnapshotError):
        parse_rm_time("yesterday")
    with pytest.raises(SnapshotError):
        parse_rm_time("2020-13-45T00:00:00Z")


def test_both_envelopes() -> None:
    item = {"code": "A", "status": "VALID"}
    assert voucher_item_from_envelope({"item": item, "code": "SUCCESS"}) == item
    assert voucher_item_from_envelope({"data": item, "eventType": "VOUCHER"}) == item
    with pytest.raises(SnapshotError, match="no voucher object"):
        voucher_item_from_envelope({"code": "SUCCESS"})
    with pytest.raises(SnapshotError, match="JSON object"):
        voucher_item_from_envelope([item])


def test_issued_is_issue_and_unknown_is_kept() -> None:
    assert snapshot_from_item({"code": "A", "status": "ISSUED"}).status == "ISSUE"
    s = snapshot_from_item({"code": "A", "status": "teleported"})
    assert s.status == "TELEPORTED" and s.raw_status == "teleported"


@pytest.mark.parametrize(
    "item, message",
    [
        ({"status": "VALID"}, "no code"),
        ({"code": "", "status": "VALID"}, "no code"),
        ({"code": 12, "status": "VALID"}, "no code"),
        ({"code": "A"}, "no status"),
        ({"code": "A", "status": "VALID", "amount": "lots"}, "amount"),
        ({"code": "A", "status": "VALID", "updatedAt": "soon"}, "updatedAt"),
        # Valid times, but beyond the nanoseconds a BIGINT holds (vouchers.rm_updated_ns).
        ({"code": "A", "status": "VALID", "updatedAt": "9999-12-31T23:59:59Z"}, "updatedAt is out of range"),
        ({"code": "A", "status": "VALID", "updatedAt": "1000-01-01T00:00:00Z"}, "updatedAt is out of range"),
        ({"code": "A", "status": "VALID", "expiry": "never"}, "expiry"),
        ({"code": "A" * 129, "status": "VALID"}, "longer"),
        ("A", "JSON object"),
    ],
)
def test_unusable_items(item, message: str) -> None:  # noqa: ANN001
    with pytest.raises(SnapshotError, match=message):
        snapshot_from_item(item)



def test_the_last_updated_at_a_bigint_holds_is_kept_and_far_expiries_are_not_limited() -> None:
    last = snapshot_from_item({
        "code": "A", "status": "VALID", "updatedAt": "2262-04-11T23:47:16.854775807Z",
        "expiry": {"type": "FIXED", "expiredAt": "9999-12-31T23:59:59Z"},
    })
    assert last.rm_updated_ns == 2**63 - 1
    assert last.fields["expires_at"] == datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone.utc)

def test_fingerprint_ignores_key_order_and_whitespace() -> None:
    a = snapshot_from_item(json.loads('{"code": "A", "status": "VALID", "amount": 1}'))
    b = snapshot_from_item(json.loads('{"amount":1,"status":"VALID","code":"A"}'))
    c = snapshot_from_item({"code": "A", "status": "VALID", "amount": 2})
    assert a.fingerprint == b.fingerprint != c.fingerprint


def test_repeated_times_parse_alike_and_errors_name_each_field() -> None:
    # Time texts are parsed once and remembered: a repeat must give the same instant, and a bad
    # text must be refused every time, naming the field it came in (not the first one it came in).
    first = parse_rm_time("2026-03-01T10:00:00.123456789+08:00", "createdAt")
    assert parse_rm_time("2026-03-01T10:00:00.123456789+08:00", "updatedAt") == first
    assert first.at == datetime(2026, 3, 1, 2, 0, 0, 123456, tzinfo=timezone.utc)
    for field in ("createdAt", "updatedAt"):
        with pytest.raises(SnapshotError, match=f"^{field} is not an RFC 3339 time"):
            parse_rm_time("yesterday", field)
        with pytest.raises(SnapshotError, match=f"^{field} is not a valid time"):
            parse_rm_time("2026-02-30T00:00:00Z", field)
