"""A real Mosquitto broker on a free port, started and stopped by tests."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_ca_and_server_cert(folder: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for 127.0.0.1 / localhost (ca.pem, server.pem, server.key)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, srv_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgeship test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(1).not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(ca_key, hashes.SHA256()))
    srv = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
           .issuer_name(ca_name).public_key(srv_key.public_key()).serial_number(2)
           .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
           .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                       x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                          critical=False).sign(ca_key, hashes.SHA256()))
    paths = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(srv.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(srv_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    for p in paths:
        p.chmod(0o644)  # mosquitto drops root and must read them (test material only)
    return paths


class Mosquitto:
    def __init__(self, folder: Path, port: int | None = None, users: dict[str, str] | None = None,
                 acl_file: Path | None = None):
        """``users``: serve MQTT over TLS (a throw-away CA, ``ca_file``) with these usernames/passwords only;
        ``acl_file``: and enforce this ACL."""
        self.folder, self.port, self.users, self.acl_file = folder, port or free_port(), users, acl_file
        self.proc: subprocess.Popen | None = None
        self.ca_file: Path | None = None

    def start(self) -> "Mosquitto":
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        conf = self.folder / "mosquitto.conf"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.folder.chmod(0o777)  # run as root, mosquitto drops to its own user: it must write its db here
        text = (f"listener {self.port} 127.0.0.1\npersistence true\n"
                f"persistence_location {self.folder}/\nmessage_size_limit 1048576\n"
                f"max_inflight_messages 100\nmax_queued_messages 10000\n")
        if self.users:
            ca, cert, key = make_ca_and_server_cert(self.folder)
            self.ca_file = ca
            pw = self.folder / "passwd"
            pw.write_text("")
            for user, password in self.users.items():
                subprocess.run([shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd", "-b", str(pw), user,
                                password], check=True, capture_output=True)
            pw.chmod(0o644)
            text += (f"cafile {ca}\ncertfile {cert}\nkeyfile {key}\nallow_anonymous false\n"
                     f"password_file {pw}\n")
            if self.acl_file:
                acl = self.folder / "acl.conf"  # a copy mosquitto (not root) can read
                acl.write_text(Path(self.acl_file).read_text())
                acl.chmod(0o644)
                text += f"acl_file {acl}\n"
        else:
            text += "allow_anonymous true\n"
        conf.write_text(text)
        # The log goes to a file: a pipe nobody reads fills up and blocks the broker (found at 500 clients).
        with open(self.folder / "mosquitto.log", "ab") as log:
            self.proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=log)
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not start: {(self.folder / 'mosquitto.log').read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.users else 'mqtt'}://127.0.0.1:{self.port}"
