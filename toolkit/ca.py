"""The fleet's certificate authority and identity register (HOME/ca).

edgeship creates the CA on first use: an ECDSA P-256 key (``ca.key``, 0600, created with O_EXCL, never
copied anywhere: not into a device folder, not into a bundle) and a self-signed certificate (``ca.pem``).
It issues

- **device** identities: a client certificate whose common name is the device id — with
  ``use_identity_as_username`` Mosquitto takes it as the username, and ``use_username_as_clientid`` makes it
  the client id, so a device cannot connect as another one — or, for brokers without TLS client
  authentication, a generated password (only its mosquitto_passwd hash stays here, in ``mosquitto.passwd``);
- **host** identities (the host tools' client certificate, common name e.g. ``edgeship-host``);
- the broker's **server** certificate.

``identities.db`` (SQLite) records every identity: name, kind, fleet, group, certificate serial, the device's
model key (its X25519 public key, which encrypted bundles are sealed for), and when it was revoked. A name
has at most one active identity. Revoking puts the serial into the CRL (``crl.pem``, which Mosquitto reads
with ``crlfile``) and removes a password from ``mosquitto.passwd``.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolkit.errors import IdentityError

KINDS = ("device", "host", "server")
CA_DAYS = 20 * 365
LEAF_DAYS = 10 * 365  # devices are hard to reach: re-enroll to renew
CRL_DAYS = 2 * 365  # every revoke (and `edgeship ca crl`) issues a fresh one; an expired CRL fails every handshake
SCHEMA = """
CREATE TABLE IF NOT EXISTS identities (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL, kind TEXT NOT NULL, fleet TEXT NOT NULL DEFAULT '',
    grp TEXT NOT NULL DEFAULT '', auth TEXT NOT NULL, serial TEXT, not_after REAL, model_key TEXT,
    enrolled REAL NOT NULL, revoked REAL
);
CREATE UNIQUE INDEX IF NOT EXISTS one_active_identity ON identities(name) WHERE revoked IS NULL;
"""


@dataclass(frozen=True)
class Issued:
    key_pem: bytes
    cert_pem: bytes
    serial: int


class FleetCA:
    """The CA in ``folder`` (created on first use) and its identity register."""

    def __init__(self, folder: Path):
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        self.folder = Path(folder)
        self.created = not (self.folder / "ca.key").exists()
        if self.created:
            self._create()
        try:
            self.key = serialization.load_pem_private_key((self.folder / "ca.key").read_bytes(), password=None)
            self.cert = x509.load_pem_x509_certificate((self.folder / "ca.pem").read_bytes())
        except (OSError, ValueError) as exc:
            raise IdentityError(f"{self.folder}: unreadable fleet CA ({exc})") from exc
        self.db = sqlite3.connect(str(self.folder / "identities.db"), timeout=30)
        self.db.row_factory = sqlite3.Row
        self.db.executescript(SCHEMA)
        if self.created:
            self.write_crl()

    @property
    def ca_pem(self) -> Path:
        return self.folder / "ca.pem"

    @property
    def crl_path(self) -> Path:
        return self.folder / "crl.pem"

    @property
    def passwd_path(self) -> Path:
        return self.folder / "mosquitto.passwd"

    def close(self) -> None:
        self.db.close()

    # ------------------------------------------------------------ issuing
    def _create(self) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        from agent.store import atomic_write
        from toolkit.signing import write_private

        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        name = _name(f"edgeship fleet CA {base64.b32encode(os.urandom(5)).decode().lower()}")
        now = _now()
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - _days(1))
                .not_valid_after(now + _days(CA_DAYS))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                             crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .sign(key, hashes.SHA256()))
        write_private(self.folder / "ca.key", key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        atomic_write(self.folder / "ca.pem", cert.public_bytes(serialization.Encoding.PEM), public=True)

    def issue(self, name: str, kind: str, fleet: str = "", group: str = "", dns: tuple[str, ...] = (),
              ips: tuple[str, ...] = (), days: int = LEAF_DAYS, model_key: bytes | None = None) -> Issued:
        """A key and certificate for ``name`` (the common name: the broker identity of a device or host),
        recorded as its active identity."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID

        self._check_free(name, kind)
        key = ec.generate_private_key(ec.SECP256R1())
        now, serial = _now(), x509.random_serial_number()
        usage = ExtendedKeyUsageOID.SERVER_AUTH if kind == "server" else ExtendedKeyUsageOID.CLIENT_AUTH
        b = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(self.cert.subject)
             .public_key(key.public_key()).serial_number(serial).not_valid_before(now - _days(1))
             .not_valid_after(now + _days(days))
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                          data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                          crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
             .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False))
        if kind == "server":
            try:
                alt = ([x509.DNSName(d) for d in (dns or (name,))]
                       + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips])
            except ValueError as exc:
                raise IdentityError(f"server certificate {name}: {exc}") from exc
            b = b.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        cert = b.sign(self.key, hashes.SHA256())
        self._record(name, kind, fleet, group, "cert", serial, (now + _days(days)).timestamp(), model_key)
        return Issued(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()),
                      cert.public_bytes(serialization.Encoding.PEM), serial)

    def enroll_password(self, name: str, fleet: str, group: str, model_key: bytes | None) -> tuple[str, str]:
        """A generated password for ``name`` (a broker without TLS client authentication): returns it and its
        mosquitto_passwd line, which replaces any line of ``name`` in mosquitto.passwd."""
        import secrets

        self._check_free(name, "device")
        password = secrets.token_urlsafe(24)
        line = passwd_line(name, password)
        self._record(name, "device", fleet, group, "password", None, None, model_key)
        self._write_passwd({**self._passwd(), name: line})
        return password, line

    def _check_free(self, name: str, kind: str) -> None:
        from toolkit.fleet.acl import HOST_USER, check_level

        if kind not in KINDS:
            raise IdentityError(f"unknown identity kind {kind!r}")
        check_level("name", name)
        if kind == "device" and name == HOST_USER:
            raise IdentityError(f"{name!r} is the host tools' username; pick another device name")
        row = self.identity(name)
        if row is not None and kind != "server":
            raise IdentityError(f"{name!r} is already enrolled ({row['kind']}, fleet {row['fleet'] or '-'}, since "
                                f"{_date(row['enrolled'])}); revoke it first: edgeship device revoke {name}")

    def _record(self, name: str, kind: str, fleet: str, group: str, auth: str, serial: int | None,
                not_after: float | None, model_key: bytes | None) -> None:
        with self.db:
            if kind == "server":  # a new server certificate replaces the old one
                self.db.execute("UPDATE identities SET revoked = ? WHERE name = ? AND kind = 'server' AND revoked "
                                "IS NULL", (time.time(), name))
            self.db.execute(
                "INSERT INTO identities (name, kind, fleet, grp, auth, serial, not_after, model_key, enrolled) "
                "VALUES (?,?,?,?,?,?,?,?,?)",
                (name, kind, fleet, group, auth, format(serial, "x") if serial is not None else None, not_after,
                 base64.b64encode(model_key).decode() if model_key else None, time.time()))

    # ------------------------------------------------------------ register
    def identity(self, name: str) -> sqlite3.Row | None:
        return self.db.execute("SELECT * FROM identities WHERE name = ? AND revoked IS NULL", (name,)).fetchone()

    def list(self, fleet: str | None = None, active: bool = False) -> list[dict[str, Any]]:
        q = "SELECT * FROM identities WHERE (? IS NULL OR fleet = ? OR kind != 'device')"
        q += " AND revoked IS NULL" if active else ""
        return [dict(r) for r in self.db.execute(q + " ORDER BY name, enrolled", (fleet, fleet))]

    def recipients(self, fleet: str, group: str | None = None, device: str | None = None) -> dict[str, bytes]:
        """{model key id: X25519 public key} of the active devices of ``fleet`` in ``group`` (or ``device``)."""
        from agent.seal import model_key_id

        rows = self.db.execute(
            "SELECT name, model_key FROM identities WHERE kind = 'device' AND revoked IS NULL AND fleet = ? AND "
            "(? IS NULL OR grp = ?) AND (? IS NULL OR name = ?) AND model_key IS NOT NULL",
            (fleet, group, group, device, device)).fetchall()
        keys = [base64.b64decode(r["model_key"]) for r in rows]
        return {model_key_id(k): k for k in keys}

    def revoke(self, name: str) -> dict[str, Any]:
        row = self.identity(name)
        if row is None:
            raise IdentityError(f"no active identity named {name!r} (see edgeship device list)")
        with self.db:
            self.db.execute("UPDATE identities SET revoked = ? WHERE id = ?", (time.time(), row["id"]))
        if row["auth"] == "password":
            self._write_passwd({k: v for k, v in self._passwd().items() if k != name})
        self.write_crl()
        return dict(row)

    def write_crl(self, path: Path | None = None) -> Path:
        """The CRL of every revoked certificate, signed now (valid CRL_DAYS), written atomically."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization

        from agent.store import atomic_write

        now = _now()
        b = (x509.CertificateRevocationListBuilder().issuer_name(self.cert.subject)
             .last_update(now - _days(1)).next_update(now + _days(CRL_DAYS))
             .add_extension(x509.CRLNumber(time.time_ns()), critical=False))
        for serial, when in self.db.execute("SELECT serial, revoked FROM identities WHERE revoked IS NOT NULL "
                                            "AND serial IS NOT NULL"):
            b = b.add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(int(serial, 16))
                                          .revocation_date(datetime.datetime.fromtimestamp(when, datetime.timezone.utc))
                                          .build())
        out = path or self.crl_path
        atomic_write(out, b.sign(self.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM), public=True)
        return out

    def _passwd(self) -> dict[str, str]:
        if not self.passwd_path.exists():
            return {}
        return {ln.split(":", 1)[0]: ln for ln in self.passwd_path.read_text().splitlines() if ":" in ln}

    def _write_passwd(self, lines: dict[str, str]) -> None:
        from agent.store import atomic_write

        atomic_write(self.passwd_path, "".join(f"{v}\n" for _, v in sorted(lines.items())).encode())


def passwd_line(user: str, password: str, iterations: int = 101) -> str:
    """A Mosquitto 2 password file line (``mosquitto_passwd``'s PBKDF2-SHA512 format, ``$7$``)."""
    salt = os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, 64)
    return f"{user}:$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def _name(cn: str) -> Any:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _days(n: int) -> datetime.timedelta:
    return datetime.timedelta(days=n)


def _date(t: float) -> str:
    return time.strftime("%Y-%m-%d", time.localtime(t))
