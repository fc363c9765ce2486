"""Portainer's request signature (docs/protocol.md, "Signature"): verify once per key, pin, or check the secret.

Portainer signs a constant message, so a (key, signature) pair that verified once stays valid: the result of
each distinct pair is cached, and a request costs one dictionary look-up instead of an ECDSA verification.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils

HEADER_PUBLIC_KEY = "X-PortainerAgent-PublicKey"
HEADER_SIGNATURE = "X-PortainerAgent-Signature"
DEFAULT_MESSAGE = "Portainer-App"
MSG_MISSING = "Missing request signature headers"
MSG_INVALID = "Invalid request signature"
_MAX_HEADER = 1024  # a hex SPKI of P-256 is 182 chars, a signature 86: anything far longer is garbage


class Verdict(Enum):
    OK = "ok"
    MISSING = "missing"
    INVALID = "invalid"
    KEY_MISMATCH = "key_mismatch"


@dataclass
class _Entry:
    valid: bool


def _decode_signature(text: str) -> tuple[int, int] | None:
    """r||s in unpadded standard base64; any decoded length but 64 is invalid."""
    try:
        raw = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(raw) != 64:
        return None
    return int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")


def _load_key(hex_key: str) -> ec.EllipticCurvePublicKey | None:
    try:
        key = serialization.load_der_public_key(bytes.fromhex(hex_key))
    except (ValueError, TypeError):
        return None
    return key if isinstance(key, ec.EllipticCurvePublicKey) else None


def verify_signature(public_key_hex: str, signature: str, message: str) -> bool:
    """The ECDSA P-256 check over MD5(message), exactly as Portainer signs."""
    key = _load_key(public_key_hex)
    rs = _decode_signature(signature)
    if key is None or rs is None:
        return False
    der = utils.encode_dss_signature(*rs)
    digest = hashlib.md5(message.encode()).digest()
    try:
        key.verify(der, digest, ec.ECDSA(utils.Prehashed(hashes.MD5())))
    except InvalidSignature:
        return False
    return True


class PinFile:
    """The pinned key shared by the worker processes of one agent: the first to claim it wins, atomically
    (written aside, then hard-linked into place, so nobody reads half a key). It lives in the agent's run
    folder: a restarted worker finds it, a restarted agent starts unpaired (as the Go agent)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def current(self) -> str | None:
        try:
            return self.path.read_text() or None
        except FileNotFoundError:
            return None

    def claim(self, key: str) -> str:
        """Pin ``key`` unless a key is pinned already; returns the pinned key either way."""
        aside = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        aside.write_text(key)
        try:
            os.link(aside, self.path)
        except FileExistsError:
            pass
        finally:
            aside.unlink(missing_ok=True)
        return self.current() or key


class SignatureVerifier:
    """Default mode pins the first key whose signature verified; secret mode checks every key, no pin.
    With a PinFile, the pin is shared with the agent's other worker processes."""

    def __init__(self, secret: str = "", cache_size: int = 1024, pin: PinFile | None = None) -> None:
        self.secret = secret
        self.pin = pin
        self.message = secret if secret else DEFAULT_MESSAGE
        self.pinned_key: str | None = None
        self.paired_at: float | None = None
        self._cache: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        self._cache_size = cache_size
        self._paired = asyncio.Event()
        self.verifications = 0  # real ECDSA checks done (the cache keeps this low)
        self.on_verification: Callable[[], None] | None = None
        """Called after each real ECDSA check (the metrics count them)."""

    @property
    def paired(self) -> bool:
        return bool(self.secret) or self.pinned_key is not None

    async def wait_paired(self) -> None:
        while not self._paired.is_set():
            if self.pin is not None and not self.secret and self._adopt_shared_pin():
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._paired.wait(), 5.0 if self.pin is not None else None)

    def _adopt_shared_pin(self) -> bool:
        """A key another worker pinned becomes ours too."""
        assert self.pin is not None
        pinned = self.pin.current()
        if pinned is None:
            return False
        self._pinned(pinned)
        return True

    def _pinned(self, key: str) -> None:
        self.pinned_key = key
        self.paired_at = time.time()
        self._paired.set()

    def check(self, public_key: str | None, signature: str | None) -> Verdict:
        if not public_key or not signature:
            return Verdict.MISSING
        if len(public_key) > _MAX_HEADER or len(signature) > _MAX_HEADER:
            return Verdict.INVALID
        if not self.secret and self.pinned_key is None and self.pin is not None:
            self._adopt_shared_pin()  # a file read per request only until this worker knows the pin
        if not self.secret and self.pinned_key is not None and public_key != self.pinned_key:
            return Verdict.KEY_MISMATCH
        if not self._verified(public_key, signature):
            return Verdict.INVALID
        if not self.secret and self.pinned_key is None:
            # Unlike Go, only a key that proved itself gets pinned: a forged first request cannot lock out.
            winner = self.pin.claim(public_key) if self.pin is not None else public_key
            self._pinned(winner)
            if winner != public_key:  # another worker pinned another key a moment before
                return Verdict.KEY_MISMATCH
        return Verdict.OK

    def _verified(self, public_key: str, signature: str) -> bool:
        cache_key = (public_key, signature)
        entry = self._cache.get(cache_key)
        if entry is None:
            self.verifications += 1
            if self.on_verification is not None:
                self.on_verification()
            entry = _Entry(verify_signature(public_key, signature, self.message))
            self._cache[cache_key] = entry
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(cache_key)
        return entry.valid
