"""Certificates for the TLS tests, made on the fly with ``cryptography`` (no openssl CLI).

A ``Pki`` is a folder of PEM files: a CA, certificates it signed (server, client,
or both usages, with DNS/IP subject alternative names) and an unrelated CA, so a
test can check that a peer signed by someone else is refused. EC P-256 keys keep
generation fast.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Authority:
    """A CA: its certificate and key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _validity(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return builder.not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(
        now + datetime.timedelta(days=1)
    )


def make_ca(common_name: str) -> Authority:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )
    return Authority(_validity(builder).sign(key, hashes.SHA256()), key)


def issue(
    ca: Authority, common_name: str, names: Sequence[str] = (), *, server: bool, client: bool
) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) signed by ``ca``; ``names`` are DNS names or IPs."""
    key = ec.generate_private_key(ec.SECP256R1())
    usages = [ExtendedKeyUsageOID.SERVER_AUTH] * server + [ExtendedKeyUsageOID.CLIENT_AUTH] * client
    sans: list[x509.GeneralName] = []
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = _validity(builder).sign(ca.key, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


class Pki:
    """PEM files in ``folder``: ``ca.crt`` signs everything made by ``add``;
    ``other-ca.crt`` is an unrelated CA."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.ca = make_ca("specdec test CA")
        self.other_ca = make_ca("someone else's CA")
        self.ca_path = self._write("ca.crt", self.ca.pem)
        self.other_ca_path = self._write("other-ca.crt", self.other_ca.pem)

    def _write(self, name: str, data: bytes) -> Path:
        path = self.folder / name
        path.write_bytes(data)
        return path

    def add(
        self,
        stem: str,
        names: Sequence[str] = (),
        *,
        server: bool = True,
        client: bool = True,
        ca: Authority | None = None,
    ) -> tuple[Path, Path]:
        """Write ``stem.crt`` and ``stem.key``; return their paths."""
        cert, key = issue(ca or self.ca, stem, names, server=server, client=client)
        return self._write(f"{stem}.crt", cert), self._write(f"{stem}.key", key)
