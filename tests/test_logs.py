"""Logs: JSON lines with request ids, and no secret, token, key or full signature ever written."""

from __future__ import annotations

import json
import logging

from receiver import create_app, logs
from receiver.client import RMAuthError, RMClient
from receiver.config import load_settings
from tests.conftest import rm_client_env
from tests.support import CALLBACK_PATH, callback_body, voucher_item

TOKEN = "ops-token-9d2f7e1c5b"


def _secret_fragments(vectors: dict, fake, signatures: list[str]) -> list[str]:  # noqa: ANN001
    fragments = [TOKEN, fake.client_secret, *fake.tokens, *fake.refresh_tokens]
    for pem in (vectors["merchant_private_pem"], vectors["rm_server_private_pem"]):
        fragments += [line for line in pem.splitlines() if len(line) > 40]  # any line of a key's body
    fragments += [s.split(" ", 1)[1] for s in signatures]
    return [f for f in fragments if f]


def test_nothing_secret_reaches_the_logs(settings_env, fake_rm, vectors, rm_signer, capsys) -> None:  # noqa: ANN001
    env = {**settings_env, **rm_client_env(fake_rm, vectors), "OPS_API_TOKEN": TOKEN, "LOG_LEVEL": "DEBUG",
           "LOG_FORMAT": "json"}
    app = create_app(load_settings(env))
    # Third-party debug logging too: urllib3 and SQLAlchemy would print headers or parameters if anything did.
    logging.getLogger("urllib3").setLevel(logging.DEBUG)
    signatures: list[str] = []
    try:
        client = app.test_client()
        fake_rm.add_voucher("LOG1", status="ISSUE")
        for item in (fake_rm.vouchers["LOG1"], fake_rm.set_status("LOG1", "VOID")):
            body = callback_body(dict(item))
            headers = rm_signer.headers(body)
            signatures.append(headers["X-Signature"])
            client.post(CALLBACK_PATH, data=body, headers=headers)
            forged = {**headers, "X-Signature": headers["X-Signature"][:-6] + "AAAAA="}
            signatures.append(forged["X-Signature"])
            client.post(CALLBACK_PATH, data=body, headers=forged)
        auth = {"Authorization": f"Bearer {TOKEN}"}
        client.get("/api/vouchers/LOG1", headers=auth)
        client.get("/api/vouchers/LOG1", headers={"Authorization": f"Bearer {TOKEN}x"})
        client.post("/api/vouchers/LOG1/reconcile", headers=auth)
        # A failing token fetch, and a log call that carelessly includes secrets.
        bad = RMClient.from_settings(load_settings({**env, "RM_CLIENT_SECRET": "wrong-secret-123"}))
        try:
            bad.get_voucher("LOG1")
        except RMAuthError as exc:
            logging.getLogger("receiver.test").warning("auth failed: %s (header Bearer %s)", exc, next(iter(fake_rm.tokens)))
        logging.getLogger("receiver.test").error("oops %s", vectors["merchant_private_pem"])
        logging.getLogger("receiver.test").info("sig %s", signatures[0])
    finally:
        app.extensions["rm_voucher_sync"].engine.dispose()
        logging.getLogger("urllib3").setLevel(logging.WARNING)
        logs.configure("WARNING")

    output = capsys.readouterr().err
    lines = [line for line in output.splitlines() if line.startswith("{")]
    assert len(lines) > 10, output[:2000]
    for fragment in _secret_fragments(vectors, fake_rm, signatures):
        assert fragment not in output, f"a secret fragment reached the logs: {fragment[:12]}..."
    assert "[redacted key]" in output and "sha256 [redacted]" in output and "Bearer [redacted]" in output


def test_json_lines_carry_request_ids_and_accepted_callbacks_log_only_at_debug(settings_env, rm_signer, capsys) -> None:  # noqa: ANN001
    """Every line of a request has its id. At INFO a plain accepted callback writes no line (its row is the
    record); a redelivery does. At DEBUG the accepted one is logged too."""
    body = callback_body(voucher_item("RID1", "ISSUE"))
    app = create_app(load_settings({**settings_env, "LOG_LEVEL": "INFO", "LOG_FORMAT": "json"}))
    try:
        client = app.test_client()
        response = client.post(CALLBACK_PATH, data=body, headers={**rm_signer.headers(body), "X-Request-Id": "req-42"})
        again = client.post(CALLBACK_PATH, data=body, headers=rm_signer.headers(body))
    finally:
        app.extensions["rm_voucher_sync"].engine.dispose()
    assert response.headers["X-Request-Id"] == "req-42"
    assert response.json == {"status": "accepted"} and again.json == {"status": "duplicate"}
    assert len(again.headers["X-Request-Id"]) == 32
    entries = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    assert not [e for e in entries if e["message"].startswith("callback accepted")]
    duplicate = [e for e in entries if e["message"].startswith("callback duplicate")]
    assert len(duplicate) == 1 and duplicate[0]["level"] == "INFO"
    assert duplicate[0]["request_id"] == again.headers["X-Request-Id"] and duplicate[0]["voucher_code"] == "RID1"
    assert {"ts", "level", "logger", "message"} <= duplicate[0].keys()

    body = callback_body(voucher_item("RID2", "ISSUE"))
    app = create_app(load_settings({**settings_env, "LOG_LEVEL": "DEBUG", "LOG_FORMAT": "json"}))
    try:
        app.test_client().post(CALLBACK_PATH, data=body, headers={**rm_signer.headers(body), "X-Request-Id": "req-43"})
    finally:
        app.extensions["rm_voucher_sync"].engine.dispose()
        logs.configure("WARNING")
    entries = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    accepted = [e for e in entries if e["message"].startswith("callback accepted")]
    assert len(accepted) == 1 and accepted[0]["level"] == "DEBUG"
    assert accepted[0]["request_id"] == "req-43" and accepted[0]["voucher_code"] == "RID2"
