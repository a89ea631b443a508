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


SHIPPED_CONF = Path(__file__).resolve().parent.parent / "deploy" / "mosquitto" / "edgeship.conf"  # mutual TLS
SHIPPED_PASSWORDS = SHIPPED_CONF.with_name("edgeship-passwords.conf")


def shipped_conf(ports: list[int], paths: dict[str, list[Path | str]], conf: Path = SHIPPED_CONF) -> str:
    """A deploy/mosquitto configuration as shipped, with the test's ports (one per listener, in order) and file
    locations (per option, one per occurrence, in order)."""
    out, ports, paths = [], list(ports), {k: list(v) for k, v in paths.items()}
    for line in conf.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        key = line.split()[0]
        if key == "listener":
            line = f"listener {ports.pop(0)} 127.0.0.1"
        elif key in paths:
            line = f"{key} {paths[key][0] if len(paths[key]) == 1 else paths[key].pop(0)}"
        out.append(line)
    return "\n".join(out) + "\n"


class Mosquitto:
    def __init__(self, folder: Path, port: int | None = None, users: dict[str, str] | None = None,
                 acl_file: Path | None = None, host_users: dict[str, str] | None = None, extra: str = "",
                 certs: Path | None = None, passwd_lines: str = ""):
        """``users``: serve MQTT over TLS (a throw-away CA, ``ca_file``) with these usernames/passwords only;
        ``acl_file``: and enforce this ACL. ``host_users``: run deploy/mosquitto/edgeship-passwords.conf as
        shipped (only ports and paths replaced): ``users`` log in on ``url`` (devices), ``host_users`` on
        ``host_url``. ``certs``: run deploy/mosquitto/edgeship.conf (mutual TLS) as shipped, with the files
        `edgeship ca server-cert -o FOLDER` wrote (ca.pem, server.pem, server.key, crl.pem) and ``acl_file``.
        ``passwd_lines``: hashed lines (mosquitto_passwd format) added to the devices' password file.
        ``extra``: configuration lines appended."""
        self.folder, self.port, self.users, self.acl_file = folder, port or free_port(), users, acl_file
        self.host_users, self.extra, self.certs, self.passwd_lines = host_users, extra, certs, passwd_lines
        self.host_port = free_port() if host_users or certs else None
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
        if self.certs:
            self.install_certs()
            self._acl()
            f = self.folder
            text = shipped_conf([self.port, self.host_port],
                                {"cafile": [f / "ca.pem"], "certfile": [f / "server.pem"], "keyfile": [f / "server.key"],
                                 "crlfile": [f / "crl.pem"], "acl_file": [f / "acl.conf"],
                                 "persistence_location": [f"{f}/"]})
        elif self.users:
            ca, cert, key = self.folder / "ca.pem", self.folder / "server.pem", self.folder / "server.key"
            if not ca.exists():  # a restart keeps the CA its clients trust
                make_ca_and_server_cert(self.folder)
            self.ca_file = ca
            pw, host_pw = self._passwd("passwd", self.users), self._passwd("host.passwd", self.host_users or {})
            with open(pw, "a") as fh:
                fh.write(self.passwd_lines)
            text += (f"cafile {ca}\ncertfile {cert}\nkeyfile {key}\nallow_anonymous false\n"
                     f"password_file {pw}\n")
            if self.acl_file:
                text += f"acl_file {self._acl()}\n"
            if self.host_users:
                text = shipped_conf([self.port, self.host_port],
                                    {"cafile": [ca], "certfile": [cert], "keyfile": [key], "password_file": [pw, host_pw],
                                     "acl_file": [self.folder / "acl.conf"], "persistence_location": [f"{self.folder}/"]},
                                    SHIPPED_PASSWORDS)
        else:
            text += "allow_anonymous true\n"
        conf.write_text(text + self.extra)
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

    def _acl(self) -> Path:
        acl = self.folder / "acl.conf"  # a copy mosquitto (not root) can read
        acl.write_text(Path(self.acl_file).read_text() if self.acl_file else "")
        acl.chmod(0o644)
        return acl

    def install_certs(self) -> None:
        """Copies of the certificate files (and CRL) that mosquitto, dropping root, can read (test material)."""
        import shutil as sh

        for name in ("ca.pem", "server.pem", "server.key", "crl.pem"):
            src = self.certs / name
            if src.exists():
                sh.copyfile(src, self.folder / name)
                (self.folder / name).chmod(0o644)
        self.ca_file = self.folder / "ca.pem"

    def reload(self, acl_file: Path | None = None, crl: Path | None = None) -> None:
        """New ACL and CRL files, then SIGHUP (what `systemctl reload mosquitto` does)."""
        import signal
        import shutil as sh

        if acl_file is not None:
            self.acl_file = acl_file
            self._acl()
        if crl is not None:
            sh.copyfile(crl, self.folder / "crl.pem")
            (self.folder / "crl.pem").chmod(0o644)
        assert self.proc is not None
        log = self.folder / "mosquitto.log"
        before = log.read_text().count("Reloading config")
        self.proc.send_signal(signal.SIGHUP)
        for _ in range(200):  # mosquitto logs it when it has re-read its files
            if log.read_text().count("Reloading config") > before:
                return
            time.sleep(0.05)
        raise RuntimeError("mosquitto did not reload")

    def _passwd(self, name: str, users: dict[str, str]) -> Path:
        pw = self.folder / name
        pw.write_text("")
        for user, password in users.items():
            subprocess.run([shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd", "-b", str(pw), user,
                            password], check=True, capture_output=True)
        pw.chmod(0o644)
        return pw

    def stop(self) -> None:
        if self.proc:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None

    def kill(self) -> None:
        """SIGKILL: no chance to save its database."""
        if self.proc:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.users or self.certs else 'mqtt'}://127.0.0.1:{self.port}"

    @property
    def host_url(self) -> str:
        """The host tools' listener (shipped configuration only)."""
        return f"mqtts://127.0.0.1:{self.host_port}"
