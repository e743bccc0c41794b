"""TLS: a self-signed certificate made on the box (`atoll tls init`), or the site's own; checked at start.

With `tls = true` the daemon serves HTTPS only, from `tls_cert` / `tls_key` (default
`<state dir>/tls/cert.pem` and `key.pem`). Plain HTTP is served only on 127.0.0.1 and
only when `http_loopback_port` is set. Before listening, the files are checked; a
missing or unreadable file, a file that is not a PEM certificate/key, a key that does not
match the certificate, or a certificate outside its validity period stops the start with
a message naming the file and the problem. The certificate's SHA-256 fingerprint is
shown on the console, in `GET /admin/status` and `atoll status`.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import psutil
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from runtime.errors import BadRequest


class TlsError(BadRequest):
    """A TLS file is missing or unusable; the message names the file and the problem."""

    code = "tls_unusable"


@dataclass(frozen=True)
class TlsInfo:
    """The certificate in use."""

    cert: Path
    key: Path
    fingerprint: str
    not_after: str
    subject: str
    sans: tuple[str, ...]


def default_paths(state_dir: Path) -> tuple[Path, Path]:
    """Where `atoll tls init` writes the certificate and key."""
    return state_dir / "tls" / "cert.pem", state_dir / "tls" / "key.pem"


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 fingerprint as browsers show it: colon-separated upper-case hex."""
    return ":".join(f"{b:02X}" for b in cert.fingerprint(hashes.SHA256()))


def lan_addresses() -> list[str]:
    """This box's IP addresses (every interface but link-local IPv6)."""
    out = []
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family in (socket.AF_INET, socket.AF_INET6):
                ip = a.address.split("%")[0]
                if not ipaddress.ip_address(ip).is_link_local:
                    out.append(ip)
    return sorted(set(out))


def generate(cert_path: Path, key_path: Path, extra_sans: list[str], days: int = 825) -> TlsInfo:
    """Write a P-256 key (0600) and a self-signed certificate for this host's name and addresses."""
    host = socket.gethostname()
    names: list[x509.GeneralName] = [x509.DNSName(host), x509.DNSName("localhost")]
    for s in [*lan_addresses(), *extra_sans]:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(s)))
        except ValueError:
            names.append(x509.DNSName(s))
    unique = list(dict.fromkeys(names))
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "atoll appliance")])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(unique), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(key, hashes.SHA256()))
    key_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = key_path.with_suffix(".tmp")
    if tmp.exists():
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    os.replace(tmp, key_path)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return check(cert_path, key_path)


def check(cert_path: Path, key_path: Path) -> TlsInfo:
    """Validate the certificate and key files; TlsError naming the file and the problem."""
    def read(p: Path, what: str) -> bytes:
        try:
            return p.read_bytes()
        except FileNotFoundError:
            raise TlsError(f"TLS {what} file {p} does not exist (run `atoll tls init` or set tls_{what})",
                           param=f"tls_{what}") from None
        except OSError as e:
            raise TlsError(f"cannot read TLS {what} file {p}: {e.strerror}", param=f"tls_{what}") from None

    try:
        certs = x509.load_pem_x509_certificates(read(cert_path, "cert"))
    except ValueError:
        raise TlsError(f"TLS cert file {cert_path} is not a PEM certificate", param="tls_cert") from None
    try:
        key = serialization.load_pem_private_key(read(key_path, "key"), password=None)
    except (ValueError, TypeError):
        raise TlsError(f"TLS key file {key_path} is not an unencrypted PEM private key",
                       param="tls_key") from None
    cert = certs[0]
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    if (key.public_key().public_bytes(serialization.Encoding.DER, pub)
            != cert.public_key().public_bytes(serialization.Encoding.DER, pub)):
        raise TlsError(f"TLS key file {key_path} does not match the certificate in {cert_path}",
                       param="tls_key")
    now = dt.datetime.now(dt.UTC)
    if now > cert.not_valid_after_utc:
        raise TlsError(f"TLS cert file {cert_path} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC",
                       param="tls_cert")
    if now < cert.not_valid_before_utc:
        raise TlsError(f"TLS cert file {cert_path} is not valid before "
                       f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC (check the clock)", param="tls_cert")
    try:
        sans = tuple(str(n.value) for n in cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        sans = ()
    return TlsInfo(cert_path, key_path, fingerprint(cert), cert.not_valid_after_utc.isoformat(),
                   cert.subject.rfc4514_string(), sans)


def server_context(info: TlsInfo) -> ssl.SSLContext:
    """A server SSL context (TLS 1.2+) for checked files."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(info.cert), str(info.key))
    except (ssl.SSLError, OSError) as e:
        raise TlsError(f"TLS files {info.cert} / {info.key} cannot be loaded: {e}", param="tls_cert") from None
    return ctx
