"""Local mode for newcomers: a development key pair under instance/, and a sample signed callback.

`scripts/run` calls ``keys`` when nothing is configured; `scripts/send-sample-callback` calls ``send``.
The private half never leaves instance/ (git-ignored) and is never RM's real key.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from .signature import load_private_key, sign_request

INSTANCE = Path("instance")
DEV_KEY_NAME = "dev-rm-server"


def write_key_pair(directory: Path, name: str) -> tuple[Path, Path]:
    """Create (once) an RSA key pair ``{name}-private.pem`` / ``{name}-public.pem`` in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    private_path, public_path = directory / f"{name}-private.pem", directory / f"{name}-public.pem"
    if not private_path.exists() or not public_path.exists():
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        private_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        private_path.chmod(0o600)
        public_path.write_bytes(
            key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        )
    return private_path, public_path


def ensure_dev_keys(instance: Path = INSTANCE) -> tuple[Path, Path]:
    """The development key pair standing in for RM's server key; return (private, public)."""
    return write_key_pair(instance, DEV_KEY_NAME)


def sample_item(code: str, status: str, updated: datetime) -> dict:
    """A voucher object shaped like the sample on RM's voucher overview page."""
    from .fake_rm import voucher_object

    return voucher_object(code, status, updated, batch_key="dev-batch", label="Free breakfast (local mode sample)")


def send_samples(url: str, instance: Path = INSTANCE) -> int:
    """Post a signed ISSUE, a newer VOID, and a redelivery of the VOID; print each answer."""
    private_path = instance / f"{DEV_KEY_NAME}-private.pem"
    if not private_path.exists():
        print(f"no development key at {private_path}: start the service with scripts/run first", file=sys.stderr)
        return 2
    key = load_private_key(private_path.read_text())
    code = "DEMO-" + secrets.token_hex(4).upper()
    now = datetime.now(timezone.utc)
    issue = json.dumps({"item": sample_item(code, "ISSUE", now - timedelta(seconds=30)), "code": "SUCCESS"})
    void = json.dumps({"item": sample_item(code, "VOID", now), "code": "SUCCESS"})
    endpoint = url.rstrip("/") + "/webhooks/revenuemonster/voucher"
    print(f"posting signed callbacks for voucher {code} to {endpoint}")
    for label, body in (("ISSUE", issue), ("VOID", void), ("VOID again (RM retry)", void)):
        headers = {"Content-Type": "application/json", **sign_request(key, method="post", body=body).as_dict()}
        try:
            response = requests.post(endpoint, data=body.encode(), headers=headers, timeout=10)
        except requests.ConnectionError:
            print(f"cannot reach {endpoint}: is scripts/run running?", file=sys.stderr)
            return 1
        print(f"  {label:<22} -> HTTP {response.status_code} {response.text.strip()}")
    print("\nsee it in the database:")
    print(f"  sqlite3 instance/receiver.db \"SELECT * FROM voucher_history WHERE code = '{code}'\"")
    _print_history(code)
    return 0


def _print_history(code: str) -> None:
    from sqlalchemy import text

    from .config import database_url_from_env, load_dotenv_if_present
    from .db import make_engine, reading

    load_dotenv_if_present()
    engine = make_engine(database_url_from_env())
    try:
        with reading(engine).connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT recorded_at, from_status, to_status, source, outcome FROM voucher_history "
                    "WHERE code = :code ORDER BY event_id"
                ),
                {"code": code},
            ).all()
    except Exception as exc:  # noqa: BLE001 - the demo still worked if only this read fails
        print(f"  (could not read the database here: {type(exc).__name__})")
        return
    finally:
        engine.dispose()
    for row in rows:
        print(f"  {row.recorded_at}  {row.from_status or '-':>8} -> {row.to_status:<8} {row.source:<9} {row.outcome}")


def main(argv: list[str] | None = None) -> int:
    """Command line: `python -m receiver.devmode keys|send [URL]`."""
    parser = argparse.ArgumentParser(prog="python -m receiver.devmode")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("keys", help="create the development key pair; print the public key's path")
    send = sub.add_parser("send", help="post signed sample callbacks")
    send.add_argument("url", nargs="?", default="http://127.0.0.1:8000")
    args = parser.parse_args(argv)
    if args.command == "keys":
        print(ensure_dev_keys()[1])
        return 0
    return send_samples(args.url)


if __name__ == "__main__":
    sys.exit(main())
