"""RevenueMonster signatures: canonical JSON, the string to sign, signing and verification.

The algorithm is documented by example only (tests/fixtures/rm-signature.json): sorted keys, no
whitespace, raw UTF-8, Go's HTML escapes, base64, then sorted ``key=value`` pairs signed with
RSA PKCS#1 v1.5 over SHA-256.
"""

from __future__ import annotations

import base64
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

SIGN_TYPE = "sha256"
SIGNATURE_PREFIX = "sha256 "

# Go's encoding/json escapes these even with HTML escaping on; RM's server is written in Go.
_GO_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


class _Literal(str):
    """A JSON number kept as written, so re-serialising never changes its digits."""


def _loads_literal(body: bytes | str) -> Any:
    return json.loads(body, parse_int=_Literal, parse_float=_Literal, parse_constant=_reject_constant)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _encode_string(value: str, ascii_only: bool) -> str:
    text = json.dumps(value, ensure_ascii=ascii_only)
    for char, escape in _GO_ESCAPES.items():
        text = text.replace(char, escape)
    return text


def _encode(value: Any, ascii_only: bool, out: list[str]) -> None:
    if isinstance(value, _Literal):
        out.append(str(value))
    elif isinstance(value, str):
        out.append(_encode_string(value, ascii_only))
    elif value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, (int, float)):
        out.append(json.dumps(value))
    elif isinstance(value, Mapping):
        out.append("{")
        for i, key in enumerate(sorted(value)):
            if i:
                out.append(",")
            out.append(_encode_string(key, ascii_only))
            out.append(":")
            _encode(value[key], ascii_only, out)
        out.append("}")
    elif isinstance(value, (list, tuple)):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _encode(item, ascii_only, out)
        out.append("]")
    else:
        raise TypeError(f"cannot canonicalise {type(value).__name__}")


def canonical_json(value: Any, *, ascii_only: bool = False) -> str:
    """Serialise a parsed JSON value the way RM does before signing."""
    out: list[str] = []
    _encode(value, ascii_only, out)
    return "".join(out)


class _NotPlain(Exception):
    """The body has a number that json.dumps might not write back digit for digit."""


def _plain_int(text: str) -> int:
    if text == "-0" or len(text) > 4000:
        raise _NotPlain
    return int(text)


def _no_float(_text: str) -> Any:
    raise _NotPlain


_GO_TRANSLATION = str.maketrans(_GO_ESCAPES)
# Built once: json.loads / json.dumps with options build a new decoder or encoder on every call.
_PLAIN_DECODE = json.JSONDecoder(parse_int=_plain_int, parse_float=_no_float, parse_constant=_reject_constant).decode
_STANDARD_DECODE = json.JSONDecoder(parse_constant=_reject_constant).decode
_CANONICAL_ENCODE = {
    ascii_only: json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=ascii_only).encode
    for ascii_only in (False, True)
}


def canonical_body(body: bytes | str | None, *, ascii_only: bool = False) -> str | None:
    """Canonical form of a raw JSON body, or None when the body signs as absent."""
    if body is None:
        return None
    if isinstance(body, bytes):
        body = body.decode("utf-8")
    if not body.strip():
        return None
    try:
        # Fast path, every callback: a body whose numbers are plain integers (_canonical_plain).
        value = _PLAIN_DECODE(body)
    except _NotPlain:
        value = _loads_literal(body)
        plain = False
    else:
        plain = True
    if plain:
        return _canonical_plain(value, ascii_only)
    if value is None or (isinstance(value, Mapping) and not value):
        return None
    return canonical_json(value, ascii_only=ascii_only)


def _canonical_plain(value: Any, ascii_only: bool = False) -> str | None:
    # Without fractions or exponents, json.dumps (C) writes exactly what canonical_json would, and
    # Go's escapes can only occur inside strings.
    if value is None or (isinstance(value, Mapping) and not value):
        return None
    return _CANONICAL_ENCODE[ascii_only](value).translate(_GO_TRANSLATION)


class PlainJson:
    """A body parsed by load_json_body whose numbers are all plain integers: verify_signed can reuse the parse."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


def load_json_body(text: str) -> tuple[Any, PlainJson | None]:
    """Parse a JSON body once for its reader and for verify_signed(parsed=...): the document, and the parse to reuse.

    The second item is None when the body has numbers json.dumps might not write back digit for
    digit; verify_signed then parses the bytes its own way. Raises ValueError for anything that is
    not JSON (NaN and Infinity included), RecursionError for absurd nesting.
    """
    try:
        value = _PLAIN_DECODE(text)
    except _NotPlain:
        return _STANDARD_DECODE(text), None
    return value, PlainJson(value)


def data_b64(canonical: str | bytes | None) -> str:
    """The ``data`` pair's value: base64 of the canonical UTF-8 text, '' when absent."""
    if not canonical:
        return ""
    raw = canonical.encode("utf-8") if isinstance(canonical, str) else canonical
    return base64.b64encode(raw).decode("ascii")


def string_to_sign(
    *, data: str, method: str, nonce: str, timestamp: str, request_url: str | None = None
) -> str:
    """The sorted ``key=value&...`` string RM signs; empty values are dropped."""
    pairs = {
        "data": data,
        "method": method.lower(),
        "nonceStr": nonce,
        "requestUrl": request_url or "",
        "signType": SIGN_TYPE,
        "timestamp": str(timestamp),
    }
    return "&".join(sorted(f"{k}={v}" for k, v in pairs.items() if v))


def load_private_key(pem: bytes | str) -> rsa.RSAPrivateKey:
    """Load an RSA private key from PEM (PKCS#1 or PKCS#8)."""
    key = serialization.load_pem_private_key(_pem_bytes(pem), password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError("not an RSA private key")
    return key


def load_public_key(pem: bytes | str) -> rsa.RSAPublicKey:
    """Load an RSA public key from PEM (SubjectPublicKeyInfo or PKCS#1)."""
    key = serialization.load_pem_public_key(_pem_bytes(pem))
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError("not an RSA public key")
    return key


def _pem_bytes(pem: bytes | str) -> bytes:
    text = pem.decode("utf-8") if isinstance(pem, bytes) else pem
    # .env files and CI secrets often carry PEMs on one line with literal "\n".
    if "\\n" in text and "\n" not in text.strip():
        text = text.replace("\\n", "\n")
    return text.strip().encode("utf-8") + b"\n"


def sign(private_key: rsa.RSAPrivateKey, message: str) -> str:
    """Return the X-Signature header value for a string to sign."""
    raw = private_key.sign(message.encode("utf-8"), padding.PKCS1v15(), hashes.SHA256())
    return SIGNATURE_PREFIX + base64.b64encode(raw).decode("ascii")


def _verify(public_key: rsa.RSAPublicKey, message: str, signature: bytes) -> bool:
    try:
        public_key.verify(signature, message.encode("utf-8"), padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        return False
    return True


@dataclass(frozen=True)
class SignedHeaders:
    """The three headers RM signs with; values exactly as sent."""

    signature: str
    nonce: str
    timestamp: str

    def as_dict(self) -> dict[str, str]:
        """Header name to value, ready for an HTTP client."""
        return {"X-Signature": self.signature, "X-Nonce-Str": self.nonce, "X-Timestamp": self.timestamp}


def new_nonce() -> str:
    """A random nonce, unique per request."""
    return secrets.token_urlsafe(24)


def sign_request(
    private_key: rsa.RSAPrivateKey,
    *,
    method: str,
    body: bytes | str | None,
    request_url: str | None = None,
    nonce: str | None = None,
    timestamp: int | str | None = None,
) -> SignedHeaders:
    """Sign a body the way RM does: outbound requests carry request_url, callbacks do not."""
    nonce = nonce or new_nonce()
    ts = str(int(time.time()) if timestamp is None else timestamp)
    message = string_to_sign(
        data=data_b64(canonical_body(body)), method=method, nonce=nonce, timestamp=ts, request_url=request_url
    )
    return SignedHeaders(signature=sign(private_key, message), nonce=nonce, timestamp=ts)


class SignatureError(Exception):
    """A callback's signature is missing, malformed, wrong or expired."""


def _candidate_data(body: bytes, parsed: PlainJson | None) -> Iterable[str]:
    # The documented canonical form first; then forms RM's undocumented variants may use.
    try:
        yield data_b64(canonical_body(body) if parsed is None else _canonical_plain(parsed.value))
    except (ValueError, UnicodeDecodeError):
        pass
    yield data_b64(body.strip() or None)
    try:
        yield data_b64(canonical_body(body, ascii_only=True))
    except (ValueError, UnicodeDecodeError):
        pass


def verify_signed(
    public_key: rsa.RSAPublicKey,
    *,
    body: bytes,
    method: str,
    signature: str | None,
    nonce: str | None,
    timestamp: str | None,
    request_url: str | None = None,
    max_age_seconds: int = 0,
    now: float | None = None,
    parsed: PlainJson | None = None,
) -> None:
    """Raise SignatureError unless the headers prove ``public_key``'s owner sent ``body``.

    ``parsed``: ``body`` itself as load_json_body parsed it (never another body's), to spare a second parse.
    """
    if not signature or not nonce or not timestamp:
        raise SignatureError("missing X-Signature, X-Nonce-Str or X-Timestamp")
    if not signature.startswith(SIGNATURE_PREFIX):
        raise SignatureError("X-Signature must start with 'sha256 '")
    try:
        raw_sig = base64.b64decode(signature[len(SIGNATURE_PREFIX):].strip(), validate=True)
    except ValueError:
        raise SignatureError("X-Signature is not base64") from None
    if not (timestamp.isascii() and timestamp.isdigit()) or len(timestamp) > 12:
        raise SignatureError("X-Timestamp is not unix seconds")
    if max_age_seconds > 0:
        skew = abs((time.time() if now is None else now) - int(timestamp))
        if skew > max_age_seconds:
            raise SignatureError(f"X-Timestamp is {int(skew)} s away from now (limit {max_age_seconds} s)")
    tried: set[str] = set()
    for data in _candidate_data(body, parsed):
        if data in tried:
            continue
        tried.add(data)
        message = string_to_sign(data=data, method=method, nonce=nonce, timestamp=timestamp, request_url=request_url)
        if _verify(public_key, message, raw_sig):
            return
    raise SignatureError("signature does not match")


def constant_time_equals(a: str, b: str) -> bool:
    """Compare secrets without leaking their length of common prefix."""
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))
