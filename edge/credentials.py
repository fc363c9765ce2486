"""Tunnel credentials from the poll response, encrypted the way Portainer encrypts them.

Portainer (api/chisel/tunnel.go encryptCredentials -> pkg/libcrypto Encrypt) seals ``user:pass`` with
AES-256-GCM; the key is the ASCII lowercase hex of MD5(EDGE_ID) (32 bytes, pkg/libcrypto/hash.go
Hash32Bit), the output is nonce(12) | ciphertext | tag(16) with no associated data, sent as base64 RawStd.
The Go agent reverses it in edge/poll.go createTunnel.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

NONCE_SIZE = 12
TAG_SIZE = 16


class CredentialsError(ValueError):
    """The credentials could not be decoded or authenticated (wrong EDGE_ID, corrupt or truncated data)."""


def credentials_key(edge_id: str) -> bytes:
    """The AES-256 key: Portainer uses the 32 hex characters of MD5(EDGE_ID) as key bytes, not the digest."""
    return hashlib.md5(edge_id.encode("utf-8"), usedforsecurity=False).hexdigest().encode("ascii")


def _b64decode_raw(text: str) -> bytes:
    core = text.strip().rstrip("=")
    try:
        return base64.b64decode(core + "=" * (-len(core) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise CredentialsError("tunnel credentials are not base64") from None


def decrypt_credentials(encoded: str, edge_id: str) -> tuple[str, str]:
    """(user, password) from the poll response's ``credentials`` field."""
    data = _b64decode_raw(encoded)
    if len(data) < NONCE_SIZE + TAG_SIZE:
        raise CredentialsError(f"tunnel credentials too short ({len(data)} bytes)")
    try:
        plain = AESGCM(credentials_key(edge_id)).decrypt(data[:NONCE_SIZE], data[NONCE_SIZE:], None)
    except InvalidTag:
        raise CredentialsError("tunnel credentials do not decrypt with this EDGE_ID") from None
    try:
        text = plain.decode("utf-8")
    except UnicodeDecodeError:
        raise CredentialsError("decrypted tunnel credentials are not text") from None
    user, sep, password = text.partition(":")
    if not sep:
        raise CredentialsError("decrypted tunnel credentials are not 'user:password'")
    return user, password


def encrypt_credentials(user: str, password: str, edge_id: str, nonce: bytes | None = None) -> str:
    """What Portainer puts in ``credentials``; used by the test stand-in of Portainer.

    ``nonce`` is for known-answer tests only; Portainer draws a fresh random one every time.
    """
    if nonce is None:
        nonce = os.urandom(NONCE_SIZE)
    if len(nonce) != NONCE_SIZE:
        raise ValueError(f"nonce must be {NONCE_SIZE} bytes")
    sealed = AESGCM(credentials_key(edge_id)).encrypt(nonce, f"{user}:{password}".encode(), None)
    return base64.b64encode(nonce + sealed).decode("ascii").rstrip("=")
