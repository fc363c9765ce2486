"""Tunnel server host key fingerprints, in the forms chisel and Portainer use.

Chisel (share/ccrypto/keys.go FingerprintKey) prints standard base64 *with* padding of SHA-256 over the
SSH wire-format public key; Portainer copies that string into the Edge key. Old keys carry chisel's
legacy MD5 colon-hex (client/client.go verifyLegacyFingerprint), which chisel still accepts with a
warning, and so do we. Comparison is constant-time, and a mismatch is decided before authentication.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import re

log = logging.getLogger(__name__)

_MD5 = re.compile(r"^[0-9a-f]{2}(?::[0-9a-f]{2}){15}$")


class InvalidFingerprintError(ValueError):
    """The expected fingerprint is in no form we can check against."""


def sha256_fingerprint(public_key_wire: bytes) -> str:
    """Chisel's fingerprint: padded base64 of SHA-256 over the wire-format key (``ssh-keygen -l`` + '=')."""
    return base64.b64encode(hashlib.sha256(public_key_wire).digest()).decode("ascii")


def md5_fingerprint(public_key_wire: bytes) -> str:
    """Chisel's legacy fingerprint: lowercase colon-separated hex of MD5 over the wire-format key."""
    digest = hashlib.md5(public_key_wire, usedforsecurity=False).digest()
    return ":".join(f"{b:02x}" for b in digest)


def is_legacy_md5(expected: str) -> bool:
    return bool(_MD5.match(expected.strip().lower()))


def _normalize_sha256(expected: str) -> bytes:
    """The 32 digest bytes; tolerates the ``SHA256:`` prefix and missing padding of ssh-keygen's output."""
    text = expected.strip().removeprefix("SHA256:").rstrip("=")
    try:
        digest = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        digest = b""
    if len(digest) != 32:
        raise InvalidFingerprintError(f"fingerprint {expected!r} is neither base64 SHA-256 nor MD5 colon-hex")
    return digest


def validate_fingerprint(expected: str) -> None:
    """Raise InvalidFingerprintError unless ``expected`` can be checked (used before connecting)."""
    if not is_legacy_md5(expected):
        _normalize_sha256(expected)


def fingerprint_matches(expected: str, public_key_wire: bytes) -> bool:
    """Whether the server key matches; warns once per check when the legacy MD5 form is used.

    Unlike chisel, a legacy MD5 value must match in full (chisel accepts any prefix of it).
    """
    if is_legacy_md5(expected):
        log.warning(
            "tunnel fingerprint %s is the deprecated MD5 form; the SHA-256 fingerprint of this server is %s",
            expected,
            sha256_fingerprint(public_key_wire),
        )
        got_md5 = md5_fingerprint(public_key_wire).encode("ascii")
        return hmac.compare_digest(expected.strip().lower().encode("ascii"), got_md5)
    want = _normalize_sha256(expected)
    return hmac.compare_digest(want, hashlib.sha256(public_key_wire).digest())
