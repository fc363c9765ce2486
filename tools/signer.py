"""Portainer's side of the agent signature (docs/protocol.md, "Signature"), for tests, benchmarks and the CLI.

`python -m tools.signer DIR` writes DIR/config.json with the two headers under HttpHeaders (and a throwaway
DIR/ca.pem), so that `DOCKER_CERT_PATH=DIR docker --config DIR --tls -H tcp://127.0.0.1:9001 ps` talks to
an agent.
"""

from __future__ import annotations

import base64
import hashlib
import json
import sys
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils

from agent.tls import self_signed_pem

DEFAULT_MESSAGE = "Portainer-App"


class Signer:
    """An ECDSA P-256 key pair that signs like Portainer: MD5 of the message, r||s, unpadded base64."""

    def __init__(self, key: ec.EllipticCurvePrivateKey | None = None) -> None:
        self.key = key or ec.generate_private_key(ec.SECP256R1())

    @property
    def public_key_hex(self) -> str:
        der = self.key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return der.hex()

    def sign(self, message: str = DEFAULT_MESSAGE) -> str:
        digest = hashlib.md5(message.encode()).digest()
        der = self.key.sign(digest, ec.ECDSA(utils.Prehashed(hashes.MD5())))
        r, s = utils.decode_dss_signature(der)
        raw = r.to_bytes(32, "big") + s.to_bytes(32, "big")
        return base64.b64encode(raw).decode().rstrip("=")

    def headers(self, message: str = DEFAULT_MESSAGE) -> dict[str, str]:
        return {
            "X-PortainerAgent-PublicKey": self.public_key_hex,
            "X-PortainerAgent-Signature": self.sign(message),
        }

    def write_docker_config(self, directory: Path, message: str = DEFAULT_MESSAGE,
                            extra: dict[str, str] | None = None) -> Path:
        """A Docker CLI config dir whose HttpHeaders carry a valid signature (valid for ever, see
        docs/protocol.md, "Signature")."""
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "config.json"
        path.write_text(json.dumps({"HttpHeaders": {**self.headers(message), **(extra or {})}}))
        # `docker --tls` (no --tlsverify) skips verification but still loads $DOCKER_CERT_PATH/ca.pem:
        # any certificate will do, so give it a throwaway one and point DOCKER_CERT_PATH here.
        ca = directory / "ca.pem"
        if not ca.exists():
            ca.write_bytes(self_signed_pem(["127.0.0.1"])[0])
        return directory


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else ".local/docker-config")
    msg = sys.argv[2] if len(sys.argv) > 2 else DEFAULT_MESSAGE
    print(Signer().write_docker_config(target, msg))
