"""TLS: `atoll tls init`, the checks that refuse a bad certificate, and the real daemon serving HTTPS only."""

from __future__ import annotations

import datetime as dt
import json
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from daemon import tls
from tests.daemon.conftest import atoll
from tests.e2e.conftest import ATOLL, free_port


def write_cert(path: Path, key: ec.EllipticCurvePrivateKey, start: dt.datetime, end: dt.datetime) -> None:
    """A self-signed certificate with the given validity."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "t")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(start).not_valid_after(end).sign(key, hashes.SHA256()))
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def test_tls_init_makes_a_private_key_and_a_certificate_for_this_box(tmp_path: Path) -> None:
    state = tmp_path / "state"
    r = atoll("tls", "init", "--san", "atoll.ward3.local", "--san", "10.9.8.7", "--state-dir", state)
    assert r.returncode == 0, r.stderr
    cert, key = tls.default_paths(state)
    assert key.stat().st_mode & 0o777 == 0o600
    info = tls.check(cert, key)
    assert {"atoll.ward3.local", "10.9.8.7", "127.0.0.1", socket.gethostname()} <= set(info.sans)
    openssl = subprocess.run(["openssl", "x509", "-in", cert, "-noout", "-fingerprint", "-sha256"],
                             capture_output=True, text=True, check=True).stdout
    assert openssl.strip().endswith(info.fingerprint) and info.fingerprint in r.stdout
    again = atoll("tls", "init", "--state-dir", state)
    assert again.returncode == 1 and "--force" in again.stderr
    assert tls.check(cert, key).fingerprint == info.fingerprint  # not replaced
    rows = json.loads(atoll("audit", "verify", "--json", "--state-dir", state).stdout)
    assert rows["ok"] and rows["rows"] == 1  # tls.cert_installed


def test_bad_tls_files_are_named_with_their_problem(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    tls.generate(cert, key, [])
    other = tmp_path / "other.pem"
    other_key = ec.generate_private_key(ec.SECP256R1())
    other.write_bytes(other_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
    now = dt.datetime.now(dt.UTC)
    expired, future = tmp_path / "expired.pem", tmp_path / "future.pem"
    write_cert(expired, other_key, now - dt.timedelta(days=30), now - dt.timedelta(days=1))
    write_cert(future, other_key, now + dt.timedelta(days=1), now + dt.timedelta(days=30))
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    for c, k, words in ((tmp_path / "nope.pem", key, ("nope.pem", "does not exist")),
                        (cert, tmp_path / "nokey.pem", ("nokey.pem", "does not exist")),
                        (junk, key, ("junk.pem", "not a PEM certificate")),
                        (cert, junk, ("junk.pem", "not an unencrypted PEM private key")),
                        (cert, other, ("other.pem", "does not match", "cert.pem")),
                        (expired, other, ("expired.pem", "expired on")),
                        (future, other, ("future.pem", "not valid before"))):
        with pytest.raises(tls.TlsError) as e:
            tls.check(c, k)
        assert all(w in e.value.message for w in words), e.value.message


def _get(url: str, ctx: ssl.SSLContext | None = None, headers: dict[str, str] | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5, context=ctx) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _serve(state: Path, port: int, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([ATOLL, "serve", "--state-dir", str(state), "--host", "127.0.0.1", "--port", str(port),
                             "--no-usb-watch", "--tls", *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


@pytest.mark.slow
def test_daemon_serves_https_only_and_shows_the_fingerprint(tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert atoll("tls", "init", "--state-dir", state).returncode == 0
    cert, _ = tls.default_paths(state)
    fp = tls.check(*tls.default_paths(state)).fingerprint
    port, plain = free_port(), free_port()
    proc = _serve(state, port, "--http-loopback-port", str(plain))
    try:
        ctx = ssl.create_default_context(cafile=str(cert))
        deadline = time.monotonic() + 30
        while _probe(f"https://127.0.0.1:{port}/healthz", ctx) != 200:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        assert _probe(f"http://127.0.0.1:{port}/healthz") == 0  # no plain HTTP on the TLS port
        assert _get(f"http://127.0.0.1:{plain}/healthz")[0] == 200  # loopback plain HTTP, as configured
        token = atoll("token", "create", "--role", "admin", "--name", "ops", "--state-dir", state).stdout.strip()
        status, body = _get(f"https://127.0.0.1:{port}/admin/status", ctx, {"Authorization": f"Bearer {token}"})
        assert status == 200 and json.loads(body)["tls"]["fingerprint_sha256"] == fp
        st = subprocess.run([ATOLL, "status", "--url", f"https://127.0.0.1:{port}", "--token", token,
                             "--state-dir", str(state)], capture_output=True, text=True, timeout=30, check=False)
        assert st.returncode == 0 and fp in st.stdout, st.stderr
        # a session cookie over TLS is Secure
        subprocess.run([ATOLL, "user", "create", "nurse", "--role", "user", "--password-stdin", "--state-dir",
                        str(state)], input="a long enough password\n", text=True, check=True, capture_output=True)
        req = urllib.request.Request(f"https://127.0.0.1:{port}/auth/login", headers={
            "Content-Type": "application/json"}, data=b'{"username":"nurse","password":"a long enough password"}')
        with urllib.request.urlopen(req, timeout=10, context=ctx) as r:
            assert "Secure" in r.headers["Set-Cookie"] and "HttpOnly" in r.headers["Set-Cookie"]
    finally:
        proc.terminate()
        out = proc.communicate(timeout=20)[0]
    assert fp in out


def _probe(url: str, ctx: ssl.SSLContext | None = None) -> int:
    try:
        return _get(url, ctx)[0]
    except (OSError, ssl.SSLError):
        return 0


@pytest.mark.slow
def test_daemon_refuses_to_start_with_bad_tls_files(tmp_path: Path) -> None:
    state = tmp_path / "state"
    r = subprocess.run([ATOLL, "serve", "--state-dir", str(state), "--port", str(free_port()), "--no-usb-watch",
                        "--tls"], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 1 and "cert.pem does not exist" in r.stderr and "Traceback" not in r.stderr
    assert atoll("tls", "init", "--state-dir", state).returncode == 0
    cert, key = tls.default_paths(state)
    other_key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "k.pem").write_bytes(other_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    now = dt.datetime.now(dt.UTC)
    write_cert(tmp_path / "old.pem", other_key, now - dt.timedelta(days=9), now - dt.timedelta(days=2))
    for c, k, words in ((cert, tmp_path / "k.pem", "does not match"),
                        (tmp_path / "old.pem", tmp_path / "k.pem", "expired on")):
        r = subprocess.run([ATOLL, "serve", "--state-dir", str(state), "--port", str(free_port()), "--no-usb-watch",
                            "--tls", "--tls-cert", str(c), "--tls-key", str(k)], capture_output=True, text=True,
                           timeout=60, check=False)
        assert r.returncode == 1 and words in r.stderr and "not starting" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
    assert key.exists()
