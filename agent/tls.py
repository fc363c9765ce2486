"""TLS for the agent API: a self-signed certificate made at every start, or the operator's files.

Portainer connects with verification skipped, so a fresh self-signed certificate is what the Go agent uses
too. With MTLS_SSL_CERT/MTLS_SSL_KEY the API serves those instead, and with MTLS_SSL_CA it also requires a
client certificate signed by that CA (Keelson's extra; in the Go agent these options only apply to the Edge
agent's HTTPS client).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import tempfile
from collections.abc import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.config import Config


def self_signed_pem(ips: Iterable[str], dns_names: Iterable[str] = ("localhost",)) -> tuple[bytes, bytes]:
    """An ECDSA P-256 certificate valid for one year, with SANs for the given names and addresses."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Portainer Agent (Keelson)")])
    now = datetime.datetime.now(datetime.UTC)
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dict.fromkeys(dns_names)]
    for ip in dict.fromkeys(ips):
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(ip)))
        except ValueError:
            continue
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def _load_pem_pair(ctx: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    """ssl only loads certificates from files: write them to a private temporary folder and remove it."""
    with tempfile.TemporaryDirectory(prefix="keelson-tls-") as tmp:
        cert_path, key_path = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
        with open(os.open(cert_path, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:
            f.write(cert_pem)
        with open(os.open(key_path, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:
            f.write(key_pem)
        ctx.load_cert_chain(cert_path, key_path)


def server_context(config: Config, ips: Iterable[str]) -> ssl.SSLContext:
    """The API's server-side context: TLS 1.2 or newer, cipher suite in the client's order of preference."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # Go clients (Portainer, the CLI) list AES-128-GCM first on AES hardware, as the Go agent then picks;
    # OpenSSL's own order would pick AES-256-GCM: ~13 % more CPU on a long stream (README, Benchmarks).
    ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    if config.mtls_cert and not config.edge:
        ctx.load_cert_chain(config.mtls_cert, config.mtls_key)
        if config.mtls_ca:
            ctx.load_verify_locations(config.mtls_ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        cert, key = self_signed_pem(ips)
        _load_pem_pair(ctx, cert, key)
    return ctx


def peer_client_context(config: Config | None = None) -> ssl.SSLContext:
    """Client context towards other agents: self-signed peers, so verification is skipped as in Go."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if config is not None and config.mtls_cert and config.mtls_ca and not config.edge:
        ctx.load_cert_chain(config.mtls_cert, config.mtls_key)  # peers require our client certificate too
    return ctx


def docker_client_context(cert_path: str, verify: bool) -> ssl.SSLContext:
    """Client context towards a TCP+TLS engine, as the Docker CLI builds it from DOCKER_CERT_PATH."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if verify:
        ctx.load_verify_locations(os.path.join(cert_path, "ca.pem"))
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    cert, key = os.path.join(cert_path, "cert.pem"), os.path.join(cert_path, "key.pem")
    if os.path.exists(cert) and os.path.exists(key):
        ctx.load_cert_chain(cert, key)
    return ctx
