"""Tunnel credentials: AES-256-GCM as portainer pkg/libcrypto Encrypt/Decrypt + api/chisel/tunnel.go."""

from __future__ import annotations

import base64
import hashlib

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from edge.credentials import CredentialsError, credentials_key, decrypt_credentials, encrypt_credentials

pytestmark = pytest.mark.edge

EDGE_ID = "7e2b0a8e-4c7e-4a8b-9a53-2f1d3b8c6d10"


def portainer_encrypt(plaintext: bytes, edge_id: str, nonce: bytes) -> str:
    """Independent re-statement of Portainer's steps, with cryptography's AESGCM directly.

    key = []byte(hex.EncodeToString(md5(edgeID))); gcm.Seal(nonce, nonce, data, nil); RawStd base64.
    """
    key = hashlib.md5(edge_id.encode()).hexdigest().encode()
    assert len(key) == 32  # AES-256 because the *hex text* is the key
    sealed = nonce + AESGCM(key).encrypt(nonce, plaintext, None)
    return base64.b64encode(sealed).decode().rstrip("=")


def test_decrypts_what_portainer_produces() -> None:
    encoded = portainer_encrypt(b"Xy7kQ2pA:p4ssW0rd", EDGE_ID, bytes(range(12)))
    assert decrypt_credentials(encoded, EDGE_ID) == ("Xy7kQ2pA", "p4ssW0rd")


def test_known_answer_matches_independent_encryption() -> None:
    nonce = bytes.fromhex("000102030405060708090a0b")
    ours = encrypt_credentials("Xy7kQ2pA", "p4ssW0rd", EDGE_ID, nonce=nonce)
    assert ours == portainer_encrypt(b"Xy7kQ2pA:p4ssW0rd", EDGE_ID, nonce)
    raw = base64.b64decode(ours + "=" * (-len(ours) % 4))
    assert raw[:12] == nonce
    assert len(raw) == 12 + len("Xy7kQ2pA:p4ssW0rd") + 16  # nonce | ciphertext | tag


def test_key_is_hex_text_of_md5() -> None:
    assert credentials_key("abc") == b"900150983cd24fb0d6963f7d28e17f72"


def test_round_trip_random_nonce() -> None:
    first = encrypt_credentials("user", "pass", EDGE_ID)
    second = encrypt_credentials("user", "pass", EDGE_ID)
    assert first != second
    assert "=" not in first
    assert decrypt_credentials(first, EDGE_ID) == ("user", "pass")
    assert decrypt_credentials(second, EDGE_ID) == ("user", "pass")


def test_password_may_contain_colons() -> None:
    # chisel settings.ParseAuth splits at the first ':' only.
    encoded = encrypt_credentials("u", "a:b:c", EDGE_ID)
    assert decrypt_credentials(encoded, EDGE_ID) == ("u", "a:b:c")


def test_padded_input_accepted() -> None:
    encoded = encrypt_credentials("user", "pw", EDGE_ID)
    padded = encoded + "=" * (-len(encoded) % 4)
    assert decrypt_credentials(padded, EDGE_ID) == ("user", "pw")


@pytest.mark.parametrize(
    ("encoded", "edge_id", "message"),
    [
        (encrypt_credentials("user", "pw", EDGE_ID), "another-edge-id", "do not decrypt"),
        ("!!!", EDGE_ID, "not base64"),
        (base64.b64encode(b"short").decode(), EDGE_ID, "too short"),
        (portainer_encrypt(b"no-colon-here", EDGE_ID, bytes(12)), EDGE_ID, "user:password"),
    ],
)
def test_bad_credentials(encoded: str, edge_id: str, message: str) -> None:
    with pytest.raises(CredentialsError, match=message):
        decrypt_credentials(encoded, edge_id)


def test_tampered_ciphertext_rejected() -> None:
    encoded = portainer_encrypt(b"u:p", EDGE_ID, bytes(12))
    raw = bytearray(base64.b64decode(encoded + "=" * (-len(encoded) % 4)))
    raw[14] ^= 1
    with pytest.raises(CredentialsError):
        decrypt_credentials(base64.b64encode(bytes(raw)).decode(), EDGE_ID)
