"""A stand-in for `python -m agent`, to test the harness's agent plumbing before (and apart from) the agent.

Started by SwarmCluster.start_agent through a wrapper given as its `python`. It records what it was started
with in `$DATA_PATH/fake-agent.json` (environment, cwd, network namespace, the PID of a child it starts, like
the agent's serf child), and serves `GET /agents` over TLS on `$KEELSON_ADVERTISE_ADDR:$AGENT_PORT` (an
address that only exists in its node's namespace) with the NodeNames listed in FAKE_AGENT_NODES. Like the
agent, it pins the first public key whose signature verifies and answers 403 to any other.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import os
import ssl
import subprocess
import sys
import tempfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils
from cryptography.x509.oid import NameOID

PINNED: list[str] = []


def verified(pub_hex: str, sig: str) -> bool:
    try:
        pub = serialization.load_der_public_key(bytes.fromhex(pub_hex))
        raw = base64.b64decode(sig + "=" * (-len(sig) % 4))
        if len(raw) != 64 or not isinstance(pub, ec.EllipticCurvePublicKey):
            return False
        der = utils.encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
        pub.verify(der, hashlib.md5(b"Portainer-App").digest(), ec.ECDSA(utils.Prehashed(hashes.MD5())))
        return True
    except Exception:
        return False


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        key = self.headers.get("X-PortainerAgent-PublicKey", "")
        sig = self.headers.get("X-PortainerAgent-Signature", "")
        if not verified(key, sig) or (PINNED and key != PINNED[0]):
            return self.reply(403, {"message": "Invalid request signature", "details": "Unauthorized"})
        if not PINNED:
            PINNED.append(key)
        if self.path != "/agents":
            return self.reply(404, {"message": "not found"})
        names = [n for n in os.environ.get("FAKE_AGENT_NODES", "").split(",") if n]
        self.reply(200, [{"IPAddress": "", "Port": os.environ["AGENT_PORT"], "NodeName": n,
                          "NodeRole": "worker", "EdgeKeySet": False} for n in names])

    def reply(self, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def tls_context(ip: str) -> ssl.SSLContext:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake-agent")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "c.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (Path(tmp) / "k.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                            serialization.PrivateFormat.PKCS8,
                                                            serialization.NoEncryption()))
        ctx.load_cert_chain(Path(tmp) / "c.pem", Path(tmp) / "k.pem")
    return ctx


def main() -> None:
    ip, port = os.environ["KEELSON_ADVERTISE_ADDR"], int(os.environ["AGENT_PORT"])
    child = subprocess.Popen(["sleep", "600"])  # stands for the agent's serf child
    # One that escapes the agent's session (FAKE_AGENT_DETACHED_CHILD=1): only the namespace still holds it.
    detached = (subprocess.Popen(["sleep", "601"], start_new_session=True).pid
                if os.environ.get("FAKE_AGENT_DETACHED_CHILD") else None)
    record = {"argv": sys.argv, "cwd": os.getcwd(), "pid": os.getpid(), "child": child.pid, "detached": detached,
              "netns": os.readlink("/proc/self/ns/net"), "env": dict(os.environ)}
    server = ThreadingHTTPServer((ip, port), Handler)
    server.socket = tls_context(ip).wrap_socket(server.socket, server_side=True)
    Path(os.environ["DATA_PATH"], "fake-agent.json").write_text(json.dumps(record))
    print(f"fake agent listening on {ip}:{port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
