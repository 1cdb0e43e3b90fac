"""RM's signature algorithm against the published vectors, and verification's failure modes."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from receiver import signature as sig


def _keys(vectors: dict) -> tuple[dict, dict]:
    private = {
        "rm_server": sig.load_private_key(vectors["rm_server_private_pem"]),
        "merchant": sig.load_private_key(vectors["merchant_private_pem"]),
    }
    public = {
        "rm_server": sig.load_public_key(vectors["rm_server_public_pem"]),
        "merchant": sig.load_public_key(vectors["merchant_public_pem"]),
    }
    return private, public


def test_every_vector_case_signs_byte_for_byte(vectors: dict) -> None:
    private, _ = _keys(vectors)
    assert len(vectors["cases"]) >= 5
    for case in vectors["cases"]:
        canonical = sig.canonical_body(case["body"])
        if case["canonical_body"] is not None:
            assert canonical == case["canonical_body"], case["name"]
        assert sig.data_b64(canonical) == case["data_b64"], case["name"]
        message = sig.string_to_sign(
            data=case["data_b64"],
            method=case["method"],
            nonce=case["nonce"],
            timestamp=case["timestamp"],
            request_url=case["request_url"],
        )
        assert message == case["string_to_sign"], case["name"]
        assert sig.sign(private[case["signed_with"]], message) == case["x_signature"], case["name"]


def test_every_vector_case_verifies(vectors: dict) -> None:
    _, public = _keys(vectors)
    for case in vectors["cases"]:
        sig.verify_signed(
            public[case["signed_with"]],
            body=(case["body"] or "").encode("utf-8"),
            method=case["method"],
            signature=case["x_signature"],
            nonce=case["nonce"],
            timestamp=case["timestamp"],
            request_url=case["request_url"],
        )


def _other_signature(signature: str) -> str:
    raw = bytearray(base64.b64decode(signature[len("sha256 "):]))
    raw[-1] ^= 1
    return "sha256 " + base64.b64encode(bytes(raw)).decode("ascii")


def test_a_body_parsed_once_verifies_as_its_bytes_do(vectors: dict) -> None:
    """verify_signed(parsed=...) reuses the reader's parse of a plain body and reaches the same verdict."""
    _, public = _keys(vectors)
    reused = 0
    for case in vectors["cases"]:
        if not (case["body"] or "").strip():
            continue
        document, parsed = sig.load_json_body(case["body"])
        assert document == json.loads(case["body"])
        reused += parsed is not None
        kwargs = dict(
            body=case["body"].encode("utf-8"), method=case["method"], nonce=case["nonce"],
            timestamp=case["timestamp"], request_url=case["request_url"], parsed=parsed,
        )
        sig.verify_signed(public[case["signed_with"]], signature=case["x_signature"], **kwargs)
        with pytest.raises(sig.SignatureError):  # the parse does not stand in for the signature
            sig.verify_signed(public[case["signed_with"]], signature=_other_signature(case["x_signature"]), **kwargs)
    assert reused >= 3
    # Fractions are not plain: no parse to reuse, and the document is the standard one.
    document, parsed = sig.load_json_body('{"amount": 1.50}')
    assert parsed is None and document == {"amount": 1.5}
    with pytest.raises(ValueError):
        sig.load_json_body('{"amount": NaN}')


def _callback_case(vectors: dict) -> dict:
    return next(c for c in vectors["cases"] if c["name"] == "seed_voucher_callback")


def _verify(vectors: dict, **overrides) -> None:  # noqa: ANN003
    case = _callback_case(vectors)
    _, public = _keys(vectors)
    kwargs = dict(
        body=case["body"].encode("utf-8"),
        method="post",
        signature=case["x_signature"],
        nonce=case["nonce"],
        timestamp=case["timestamp"],
    )
    kwargs.update(overrides)
    key = kwargs.pop("key", public["rm_server"])
    sig.verify_signed(key, **kwargs)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"body": b'{"item": {"code": "NAklEfbVdV", "status": "VALID"}, "code": "SUCCESS"}'}, "does not match"),
        ({"signature": None}, "missing"),
        ({"nonce": ""}, "missing"),
        ({"timestamp": None}, "missing"),
        ({"nonce": "another-nonce"}, "does not match"),
        ({"timestamp": "1528450586"}, "does not match"),
        ({"timestamp": "15284505x5"}, "unix seconds"),
        ({"signature": "sha512 AAAA"}, "sha256"),
        ({"signature": "sha256 not*base64"}, "base64"),
    ],
)
def test_tampering_is_rejected(vectors: dict, overrides: dict, message: str) -> None:
    with pytest.raises(sig.SignatureError, match=message):
        _verify(vectors, **overrides)


def test_wrong_key_is_rejected(vectors: dict) -> None:
    _, public = _keys(vectors)
    with pytest.raises(sig.SignatureError, match="does not match"):
        _verify(vectors, key=public["merchant"])


def test_timestamp_window(vectors: dict) -> None:
    case = _callback_case(vectors)
    ts = int(case["timestamp"])
    _verify(vectors, max_age_seconds=900, now=ts + 899)
    _verify(vectors, max_age_seconds=900, now=ts - 899)
    with pytest.raises(sig.SignatureError, match="away from now"):
        _verify(vectors, max_age_seconds=900, now=ts + 901)
    with pytest.raises(sig.SignatureError, match="away from now"):
        _verify(vectors, max_age_seconds=900, now=ts - 901)
    _verify(vectors, max_age_seconds=0, now=ts + 10**9)


def test_signature_over_raw_body_is_accepted(vectors: dict) -> None:
    """RM documents its canonical form only by example; a signature over the exact bytes also proves origin."""
    private, public = _keys(vectors)
    body = b'{"code":"SUCCESS","item":{"status":"VOID","code":"X1"}}'
    message = sig.string_to_sign(data=base64.b64encode(body).decode(), method="post", nonce="n", timestamp="1")
    sig.verify_signed(
        public["rm_server"], body=body, method="post", signature=sig.sign(private["rm_server"], message),
        nonce="n", timestamp="1",
    )


def test_signature_over_ascii_escaped_canonical_form_is_accepted(vectors: dict) -> None:
    private, public = _keys(vectors)
    case = next(c for c in vectors["cases"] if c["name"] == "non_ascii_and_html_chars")
    escaped = sig.canonical_body(case["body"], ascii_only=True)
    assert "\\u5496" in escaped and "Caf\\u00e9" in escaped and "\\u003cb\\u003e" in escaped
    assert escaped != case["canonical_body"]
    message = sig.string_to_sign(data=sig.data_b64(escaped), method="post", nonce="n", timestamp="1")
    sig.verify_signed(
        public["rm_server"], body=case["body"].encode(), method="post",
        signature=sig.sign(private["rm_server"], message), nonce="n", timestamp="1",
    )
    # The alternate forms are alternates of *this* body: another body still fails.
    with pytest.raises(sig.SignatureError):
        sig.verify_signed(
            public["rm_server"], body=case["body"].replace("REDEEMED", "VOID").encode(), method="post",
            signature=sig.sign(private["rm_server"], message), nonce="n", timestamp="1",
        )


def test_numbers_keep_their_literal_digits() -> None:
    assert sig.canonical_body('{"b": 1.50, "a": 10000000000000000000001, "c": -0.0}') == (
        '{"a":10000000000000000000001,"b":1.50,"c":-0.0}'
    )


def test_absent_bodies_sign_without_data() -> None:
    for body in (None, "", "  ", "{}", "null"):
        assert sig.canonical_body(body) is None
    assert sig.canonical_body("[]") == "[]"


def test_pem_with_escaped_newlines_loads(vectors: dict) -> None:
    one_line = vectors["rm_server_public_pem"].strip().replace("\n", "\\n")
    assert sig.load_public_key(one_line).key_size == 2048


def test_sign_request_uses_fresh_nonces(vectors: dict) -> None:
    private, public = _keys(vectors)
    a = sig.sign_request(private["merchant"], method="get", body=None, request_url="https://x/v3/voucher/A")
    b = sig.sign_request(private["merchant"], method="get", body=None, request_url="https://x/v3/voucher/A")
    assert a.nonce != b.nonce and len(a.nonce) >= 16
    sig.verify_signed(public["merchant"], body=b"", method="get", signature=a.signature, nonce=a.nonce,
                      timestamp=a.timestamp, request_url="https://x/v3/voucher/A", max_age_seconds=120)


def test_canonical_json_matches_go_escaping() -> None:
    assert sig.canonical_json({"k": "<>&\u2028\u2029é\"\\\n"}) == '{"k":"\\u003c\\u003e\\u0026\\u2028\\u2029é\\"\\\\\\n"}'
    assert json.loads(sig.canonical_json({"z": [1, {"b": None, "a": True}]})) == {"z": [1, {"a": True, "b": None}]}


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**30), 10**30)
    | st.text(alphabet=st.sampled_from("ab<>&\u2028\u2029\"\\\n\x01é漢😀")) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=1500, deadline=None)
@given(value=_json_values, ascii_only=st.booleans(), indent=st.sampled_from([None, 2]))
def test_canonical_body_fast_path_equals_literal_encoder(value, ascii_only, indent) -> None:  # noqa: ANN001
    """The json.dumps fast path used on every callback writes exactly what the literal-keeping encoder writes."""
    body = json.dumps(value, indent=indent, ensure_ascii=ascii_only)
    expected = None if value is None or value == {} else sig.canonical_json(sig._loads_literal(body), ascii_only=ascii_only)
    assert sig.canonical_body(body, ascii_only=ascii_only) == expected


def test_canonical_body_keeps_fractions_exponents_and_negative_zero_as_written() -> None:
    body = '{"b": 1.50, "a": -0, "c": 1E+2, "d": [0.1, 10]}'
    assert sig.canonical_body(body) == '{"a":-0,"b":1.50,"c":1E+2,"d":[0.1,10]}'
