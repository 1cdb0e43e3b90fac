"""The RM client against the vectors and against the fake RM over HTTP."""

from __future__ import annotations

import threading
import time

import pytest
import requests

from receiver.client import RMAuthError, RMClient, RMError, RMNotFound, RMUnavailable
from receiver.config import load_settings
from receiver.signature import load_private_key
from tests.conftest import rm_client_env


def test_client_signs_the_vector_requests_byte_for_byte(vectors) -> None:  # noqa: ANN001
    settings = load_settings({
        "RM_INSECURE_SKIP_SIGNATURE": "1", "RM_CLIENT_ID": "id", "RM_CLIENT_SECRET": "secret",
        "RM_PRIVATE_KEY": vectors["merchant_private_pem"],
    })
    client = RMClient.from_settings(settings)
    requests_cases = [c for c in vectors["cases"] if c["kind"] == "request"]
    assert len(requests_cases) == 3
    for case in requests_cases:
        url = case["request_url"]
        headers = client.signed_headers(case["method"], url, case["body"], nonce=case["nonce"],
                                        timestamp=int(case["timestamp"]))
        assert headers == {"X-Signature": case["x_signature"], "X-Nonce-Str": case["nonce"],
                           "X-Timestamp": case["timestamp"]}, case["name"]
    assert client.url_for(f"/v3/voucher/{client.voucher_path('NAklEfbVdV')}") == requests_cases[0]["request_url"]
    assert client.voucher_path("rms@xR4#3/u") == "rms@xR4%233%2Fu"


def test_get_voucher_fetches_one_token_and_signs_every_request(rm_client, fake_rm) -> None:  # noqa: ANN001
    fake_rm.add_voucher("rms@xR43u4bRhUU", status="ISSUE")
    fake_rm.add_voucher("odd#code/1", status="VOID")
    assert rm_client.get_voucher("rms@xR43u4bRhUU")["status"] == "ISSUE"
    assert rm_client.get_voucher("odd#code/1")["status"] == "VOID"
    assert fake_rm.token_requests == 1
    assert [r.status for r in fake_rm.requests_for("get_voucher")] == [200, 200]
    assert [r.code for r in fake_rm.requests_for("get_voucher")] == ["rms@xR43u4bRhUU", "odd#code/1"]


def test_post_lookup_mode(fake_rm, vectors) -> None:  # noqa: ANN001
    fake_rm.add_voucher("P1", status="REDEEMED")
    settings = load_settings({"RM_INSECURE_SKIP_SIGNATURE": "1", "RM_VOUCHER_LOOKUP_METHOD": "POST",
                              **rm_client_env(fake_rm, vectors)})
    client = RMClient.from_settings(settings)
    assert client.get_voucher("P1")["status"] == "REDEEMED"
    assert fake_rm.requests_for("get_voucher")[0].method == "POST"


def test_concurrent_callers_share_one_token_fetch(rm_client, fake_rm) -> None:  # noqa: ANN001
    for i in range(16):
        fake_rm.add_voucher(f"C{i}")
    barrier = threading.Barrier(16)
    results = []

    def call(i: int) -> None:
        barrier.wait()
        results.append(rm_client.get_voucher(f"C{i}")["code"])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == sorted(f"C{i}" for i in range(16))
    assert fake_rm.token_requests == 1


def test_expired_token_is_refreshed_once(rm_client, fake_rm) -> None:  # noqa: ANN001
    fake_rm.add_voucher("T1")
    rm_client.get_voucher("T1")
    fake_rm.expire_tokens()
    assert rm_client.get_voucher("T1")["code"] == "T1"
    statuses = [r.status for r in fake_rm.requests_for("get_voucher")]
    assert statuses == [200, 401, 200]
    assert fake_rm.token_requests == 2


def test_wrong_credentials_fail_clearly(fake_rm, vectors) -> None:  # noqa: ANN001
    env = {**rm_client_env(fake_rm, vectors), "RM_CLIENT_SECRET": "wrong"}
    client = RMClient.from_settings(load_settings({"RM_INSECURE_SKIP_SIGNATURE": "1", **env}))
    with pytest.raises(RMAuthError) as info:
        client.get_voucher("X")
    assert info.value.code == "INVALID_CLIENT" and "wrong" not in str(info.value)


def test_fake_rm_rejects_a_wrong_signature_with_rms_error_shape(fake_rm, vectors) -> None:  # noqa: ANN001
    fake_rm.add_voucher("S1")
    env = {**rm_client_env(fake_rm, vectors), "RM_PRIVATE_KEY": vectors["rm_server_private_pem"]}
    client = RMClient.from_settings(load_settings({"RM_INSECURE_SKIP_SIGNATURE": "1", **env}))
    with pytest.raises(RMError) as info:
        client.get_voucher("S1")
    assert info.value.code == "INVALID_REQUEST_SIGNATURE" and info.value.http_status == 400
    assert len(fake_rm.requests_for("get_voucher")) == 1  # a 4xx is never retried


def test_fake_rm_rejects_a_skewed_timestamp(rm_client, fake_rm) -> None:  # noqa: ANN001
    fake_rm.add_voucher("S2")
    url = rm_client.url_for("/v3/voucher/S2")
    headers = {"Authorization": f"Bearer {rm_client.access_token()}",
               **rm_client.signed_headers("GET", url, None, timestamp=int(time.time()) - 600)}
    response = requests.get(url, headers=headers, timeout=5)
    assert response.status_code == 400
    assert response.json() == {"error": {"code": "INVALID_TIMESTAMP", "message": "X-Timestamp is too far from RM's clock"}}
    unsigned = requests.get(url, headers={"Authorization": headers["Authorization"]}, timeout=5)
    assert unsigned.json()["error"]["code"] == "INVALID_REQUEST_SIGNATURE"
    no_token = requests.get(url, headers={k: v for k, v in headers.items() if k != "Authorization"}, timeout=5)
    assert no_token.status_code == 401 and no_token.json()["error"]["code"] == "UNAUTHORIZED"


def test_not_found_is_typed_and_not_retried(rm_client, fake_rm) -> None:  # noqa: ANN001
    with pytest.raises(RMNotFound) as info:
        rm_client.get_voucher("NOPE")
    assert info.value.code == "VOUCHER_NOT_FOUND" and info.value.http_status == 404
    assert len(fake_rm.requests_for("get_voucher")) == 1


def test_429_and_5xx_are_retried_with_backoff(rm_client, fake_rm) -> None:  # noqa: ANN001
    for i in range(30):
        fake_rm.add_voucher(f"R{i}")
    fake_rm.faults.rate_429 = 0.2
    fake_rm.faults.rate_5xx = 0.2
    rm_client.max_retries = 12
    for i in range(30):
        assert rm_client.get_voucher(f"R{i}")["code"] == f"R{i}"
    statuses = [r.status for r in fake_rm.requests_for("get_voucher")]
    assert statuses.count(200) == 30
    assert 429 in statuses and any(s >= 500 for s in statuses)


def test_retries_run_out_as_unavailable(rm_client, fake_rm) -> None:  # noqa: ANN001
    fake_rm.add_voucher("U1")
    fake_rm.faults.rate_5xx = 1.0
    rm_client.max_retries = 2
    with pytest.raises(RMUnavailable):
        rm_client.get_voucher("U1")
    assert len(fake_rm.requests_for("get_voucher")) == 3


def test_network_errors_are_retried(vectors) -> None:  # noqa: ANN001
    from tests.support import free_port

    port = free_port()  # nothing listens here
    client = RMClient(
        api_base_url=f"http://127.0.0.1:{port}", oauth_base_url=f"http://127.0.0.1:{port}", client_id="a",
        client_secret="b", private_key=load_private_key(vectors["merchant_private_pem"]), max_retries=2,
        backoff_base=0.01,
    )
    calls = []
    client._on_request = lambda endpoint, result: calls.append((endpoint, result))
    with pytest.raises(RMUnavailable):
        client.get_voucher("X")
    assert calls == [("token", "connect_error")] * 3


def test_rate_cap(fake_rm, vectors) -> None:  # noqa: ANN001
    fake_rm.add_voucher("RC")
    client = RMClient.from_settings(
        load_settings({"RM_INSECURE_SKIP_SIGNATURE": "1", "RM_MAX_REQUESTS_PER_SECOND": "20",
                       **rm_client_env(fake_rm, vectors)})
    )
    started = time.monotonic()
    for _ in range(30):
        client.get_voucher("RC")
    # 31 requests (one token) at 20/s with a burst of 2 cannot finish in under ~1.4 s.
    assert time.monotonic() - started >= 1.3


def test_batches_are_paged(rm_client, fake_rm) -> None:  # noqa: ANN001
    fake_rm.page_size = 7
    fake_rm.create_vouchers(30, batches=2)
    batches = list(rm_client.voucher_batches())
    assert [b["key"] for b in batches] == ["batch-0", "batch-1"]
    codes = [item["code"] for items, _ in rm_client.batch_voucher_pages("batch-1") for item in items]
    assert len(codes) == 15 and len(set(codes)) == 15
    pages = list(rm_client.batch_voucher_pages("batch-0"))
    resumed = [item["code"] for items, _ in rm_client.batch_voucher_pages("batch-0", pages[0][1]) for item in items]
    assert resumed == [item["code"] for items, _ in pages[1:] for item in items]


def test_a_stopped_fake_never_writes_to_a_reused_descriptor(fake_rm) -> None:  # noqa: ANN001
    """A fake's late wake-up after shutdown must not land in whatever now holds its old pipe's number."""
    import os

    trigger = fake_rm._server.trigger
    old_write_end = trigger.trigger
    fake_rm.shutdown()
    r, w = os.pipe()
    os.dup2(w, old_write_end)  # the number is free again: say a new connection got it
    try:
        trigger.pull_trigger()  # what a task thread finishing an answer after shutdown does
        os.set_blocking(r, False)
        with pytest.raises(BlockingIOError):
            os.read(r, 1)
    finally:
        for fd in {r, w, old_write_end}:
            os.close(fd)
