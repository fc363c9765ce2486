from __future__ import annotations

from agent.auth import SignatureVerifier, Verdict, verify_signature
from tools.signer import Signer


def test_portainer_signature_shape() -> None:
    s = Signer()
    assert len(s.public_key_hex) == 182
    sig = s.sign()
    assert len(sig) == 86 and "=" not in sig
    assert verify_signature(s.public_key_hex, sig, "Portainer-App")
    assert not verify_signature(s.public_key_hex, sig, "other")


def test_pin_only_after_a_valid_signature() -> None:
    v = SignatureVerifier()
    a, b = Signer(), Signer()
    assert v.check(a.public_key_hex, b.sign()) is Verdict.INVALID
    assert not v.paired
    assert v.check(a.public_key_hex, a.sign()) is Verdict.OK
    assert v.pinned_key == a.public_key_hex
    assert v.check(b.public_key_hex, b.sign()) is Verdict.KEY_MISMATCH
    assert v.check(None, a.sign()) is Verdict.MISSING


def test_each_distinct_pair_is_verified_once() -> None:
    v = SignatureVerifier()
    a = Signer()
    h = a.headers()
    for _ in range(50):
        assert v.check(h["X-PortainerAgent-PublicKey"], h["X-PortainerAgent-Signature"]) is Verdict.OK
    assert v.verifications == 1
    # Portainer signs afresh (new k) per request: a new signature is one more check, then cached too
    assert v.check(a.public_key_hex, a.sign()) is Verdict.OK
    assert v.verifications == 2


def test_secret_mode() -> None:
    v = SignatureVerifier(secret="abc")
    a, b = Signer(), Signer()
    assert v.check(a.public_key_hex, a.sign("abc")) is Verdict.OK
    assert v.check(b.public_key_hex, b.sign("abc")) is Verdict.OK
    assert v.check(a.public_key_hex, a.sign()) is Verdict.INVALID
    assert v.pinned_key is None and v.paired
