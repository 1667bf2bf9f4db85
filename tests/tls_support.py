"""Certificates for the secured local broker, made on the spot with ``cryptography``.

A CA signs the broker's certificate (for 127.0.0.1 and localhost, so clients verify the host
name) and a client certificate (mutual TLS); a second, unrelated CA gives a TLS mismatch. The
client key is encrypted with a passphrase, so the key-passphrase path of the client config is
exercised too.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

KEYSTORE_PASSWORD = "broker-keystore-pass"
CLIENT_KEY_PASSPHRASE = "client-key-pass"


@dataclass(frozen=True)
class TlsFiles:
    ca: Path  # PEM: the CA that signed the broker and the client
    other_ca: Path  # PEM: a CA that signed neither (a TLS mismatch)
    broker_keystore: Path  # PKCS#12, password KEYSTORE_PASSWORD
    client_cert: Path  # PEM
    client_key: Path  # PEM, encrypted with CLIENT_KEY_PASSPHRASE
    client_key_passphrase: Path  # file holding CLIENT_KEY_PASSPHRASE


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    hosts: tuple[str, ...] = (),
    usage: x509.ObjectIdentifier | None = None,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    issuer_name, issuer_key = issuer if issuer is not None else (_name(subject), key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if hosts:
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def make_tls_files(directory: Path) -> TlsFiles:
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _certificate("anomstream test CA", ca_key, None, ca=True)
    other_key = ec.generate_private_key(ec.SECP256R1())
    other_cert = _certificate("some other CA", other_key, None, ca=True)
    issuer = (ca_cert.subject, ca_key)

    broker_key = ec.generate_private_key(ec.SECP256R1())
    broker_cert = _certificate("localhost", broker_key, issuer, hosts=("127.0.0.1", "localhost"),
                               usage=ExtendedKeyUsageOID.SERVER_AUTH)
    client_key = ec.generate_private_key(ec.SECP256R1())
    client_cert = _certificate("anomstream-client", client_key, issuer,
                               usage=ExtendedKeyUsageOID.CLIENT_AUTH)

    files = TlsFiles(
        ca=directory / "ca.pem",
        other_ca=directory / "other-ca.pem",
        broker_keystore=directory / "broker.p12",
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
        client_key_passphrase=directory / "client.key.pass",
    )
    files.ca.write_bytes(_pem(ca_cert))
    files.other_ca.write_bytes(_pem(other_cert))
    files.broker_keystore.write_bytes(
        pkcs12.serialize_key_and_certificates(
            b"broker", broker_key, broker_cert, [ca_cert],
            serialization.BestAvailableEncryption(KEYSTORE_PASSWORD.encode()),
        )
    )
    files.client_cert.write_bytes(_pem(client_cert))
    files.client_key.write_bytes(
        client_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(CLIENT_KEY_PASSPHRASE.encode()),
        )
    )
    files.client_key_passphrase.write_text(CLIENT_KEY_PASSPHRASE + "\n")
    return files
