"""Security: authentication, permissions, TLS, connection limits, the default bind.

docs/security.md is the specification these tests hold the broker to.
Topic and subscription limits, frame size against hostile clients and
slow clients are in test_hostile.py.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import re
import socket
import ssl
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import impl_env
from reliability import Bystander, expect_err, read_topic, stats
from v0client import V0Client, frame as v0frame, pub_frame
from v1support import (
    FRAME_TOO_LARGE, OLDEST, V1Conn, cmt, frame, hel, pub, s, spec)

pytestmark = pytest.mark.integration

UNAUTHORIZED = 14
ALICE_SECRET = "correct horse battery staple"
BOB_SECRET = "b0b-s3cret-t0ken"


def _cli(impl: str, *args: str, input_: bytes | None = None, timeout: float = 60,
         cwd: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "broker", *args], env=impl_env(impl),
                          input=input_, capture_output=True, timeout=timeout, cwd=cwd)


# -- fixtures: a users file, a CA and a server certificate ------------------------

@pytest.fixture(scope="module")
def secrets_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("secrets")


def _users_file(path: Path, alice_hash: str, bob_hash: str, allow_anonymous: bool) -> Path:
    path.write_text(f"""
allow_anonymous = {"true" if allow_anonymous else "false"}

[anonymous]
publish = ["public.*"]
subscribe = ["public.*"]

[users.alice]
secret = "{alice_hash}"
publish = ["chat.*", "public.*"]
subscribe = ["*"]

[users.bob]
secret = "{bob_hash}"
publish = []
subscribe = ["chat.*"]
""")
    return path


@pytest.fixture(scope="module")
def users(secrets_dir):
    """``(closed_file, open_file)``: anonymous refused / allowed. Alice's hash
    comes from the CLI (``pylogstreams hash-secret``), Bob's from the library."""
    from broker.auth import check_secret, hash_secret
    proc = _cli("c", "hash-secret", "--secret", ALICE_SECRET)
    assert proc.returncode == 0, proc.stderr
    alice = proc.stdout.decode().strip()
    assert re.fullmatch(r"scrypt\$\d+\$\d+\$\d+\$[A-Za-z0-9+/=]+\$[A-Za-z0-9+/=]+", alice), alice
    assert ALICE_SECRET not in alice
    assert check_secret(ALICE_SECRET, alice) and not check_secret("wrong", alice)
    bob = hash_secret(BOB_SECRET)
    return (_users_file(secrets_dir / "users-closed.toml", alice, bob, False),
            _users_file(secrets_dir / "users-open.toml", alice, bob, True))


@pytest.fixture(scope="module")
def tls_files(secrets_dir):
    """A CA, and a server certificate it signed for 127.0.0.1 and localhost."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("pylogstreams test CA"))
          .issuer_name(name("pylogstreams test CA")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(name("localhost")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    (secrets_dir / "ca.pem").write_bytes(ca.public_bytes(pem))
    (secrets_dir / "server.pem").write_bytes(cert.public_bytes(pem))
    (secrets_dir / "server.key").write_bytes(key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    # A second, unrelated CA: a client trusting only it must refuse our server.
    other_key = ec.generate_private_key(ec.SECP256R1())
    other = (x509.CertificateBuilder().subject_name(name("other CA")).issuer_name(name("other CA"))
             .public_key(other_key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5))
             .not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
             .sign(other_key, hashes.SHA256()))
    (secrets_dir / "other-ca.pem").write_bytes(other.public_bytes(pem))
    return {k: str(secrets_dir / f) for k, f in (("ca", "ca.pem"), ("cert", "server.pem"),
                                                  ("key", "server.key"),
                                                  ("other_ca", "other-ca.pem"))}


def _aut(user: str, secret: str) -> bytes:
    return s(user) + s(secret)


# -- the users file and hashes ---------------------------------------------------------

def test_plaintext_secret_in_users_file_is_refused(impl, tmp_path):
    bad = tmp_path / "users.toml"
    bad.write_text('[users.eve]\nsecret = "hunter2"\npublish = ["*"]\n')
    proc = _cli(impl, "serve", "--port", "0", "--data-dir", str(tmp_path / "d"),
                "--auth-file", str(bad), timeout=30)
    assert proc.returncode != 0
    err = proc.stderr.decode()
    assert "hash-secret" in err and "scrypt" in err, err[-2000:]
    assert "hunter2" not in err


def test_unknown_user_costs_a_hash_too():
    """No fast path for unknown names: timing does not tell which users exist."""
    from broker.auth import Authenticator, User, hash_secret
    auth = Authenticator({"alice": User("alice", secret=hash_secret("x"))}, False, User("anonymous"))

    async def timed(name, secret):
        t0 = time.perf_counter()
        assert await auth.verify(name, secret) is None
        return time.perf_counter() - t0

    async def main():
        known = min([await timed("alice", b"wrong%d" % i) for i in range(3)])
        unknown = min([await timed("mallory%d" % i, b"wrong") for i in range(3)])
        return known, unknown

    known, unknown = asyncio.run(main())
    assert unknown > known * 0.5, "unknown user %.4f s vs wrong secret %.4f s" % (unknown, known)


# -- authentication, v1 --------------------------------------------------------------------

@pytest.fixture
def closed_server(server, users):
    return server("--auth-file", str(users[0]))


def test_v1_requests_before_aut_are_unauthorized(closed_server):
    with V1Conn(closed_server.port) as c:
        c.hello()
        c.ping()  # PNG is allowed before AUT (liveness)
        for kind, payload in ((b"PUB", pub("chat.x", [b"m"])), (b"SUB", spec("chat.x", OLDEST)),
                              (b"CMT", cmt("chat.x", 0)), (b"TOP", b""), (b"OFS", b""),
                              (b"STA", b""), (b"SEK", spec("chat.x", OLDEST)),
                              (b"UNS", s("chat.x"))):
            rid = c.send(kind, payload)
            expect_err(c, rid, UNAUTHORIZED)
        c.ping()
    assert "chat.x" not in _admin_topics(closed_server)


def _admin_topics(srv) -> dict:
    with V1Conn(srv.port) as c:
        c.hello()
        c.request(b"AUT", _aut("alice", ALICE_SECRET))
        return {t["topic"]: t for t in c.json(b"TOP")}


def test_v1_wrong_secret_and_unknown_user_three_strikes(closed_server):
    with V1Conn(closed_server.port) as c:
        c.hello()
        expect_err(c, c.send(b"AUT", _aut("alice", "not it")), UNAUTHORIZED)
        expect_err(c, c.send(b"AUT", _aut("mallory", ALICE_SECRET)), UNAUTHORIZED)
        c.ping()  # two failures: still open
        rid = c.send(b"AUT", _aut("alice", ""))
        frames = c.wait_closed(10)  # the third failure closes the connection
    assert [(k, r, struct.unpack_from(">H", p)[0]) for k, r, p in frames] == [
        (b"ERR", rid, UNAUTHORIZED)]
    log = closed_server.log_text()
    assert "authentication failed for user 'alice'" in log
    assert "authentication failed for user 'mallory'" in log
    assert ALICE_SECRET not in log and "not it" not in log  # secrets are never logged
    # A good AUT after one failure works.
    with V1Conn(closed_server.port) as c:
        c.hello()
        expect_err(c, c.send(b"AUT", _aut("bob", "nope")), UNAUTHORIZED)
        c.request(b"AUT", _aut("bob", BOB_SECRET))
        c.ping()


def test_v1_per_user_permissions(closed_server):
    port = closed_server.port
    with V1Conn(port) as alice, V1Conn(port) as bob:
        alice.hello()
        alice.request(b"AUT", _aut("alice", ALICE_SECRET))
        bob.hello()
        bob.request(b"AUT", _aut("bob", BOB_SECRET))
        # alice publishes to chat.* and public.*, reads everything.
        assert alice.publish("chat.room", [b"hi"]) == (0, 1)
        assert alice.publish("public.news", [b"news"]) == (0, 1)
        expect_err(alice, alice.send(b"PUB", pub("secret.plans", [b"x"])), UNAUTHORIZED)
        # bob publishes nowhere, reads chat.* only.
        expect_err(bob, bob.send(b"PUB", pub("chat.room", [b"bob was here"])), UNAUTHORIZED)
        expect_err(bob, bob.send(b"SUB", spec("public.news", OLDEST)), UNAUTHORIZED)
        expect_err(bob, bob.send(b"CMT", cmt("public.news", 1)), UNAUTHORIZED)
        rid, start = bob.subscribe("chat.room", OLDEST)
        assert [m[2] for m in bob.read_messages(1, rid)] == [b"hi"]
        bob.request(b"CMT", cmt("chat.room", 1))
    info = _admin_topics(closed_server)
    assert info["chat.room"]["messages"] == 1
    assert info.get("secret.plans", {"messages": 0})["messages"] == 0
    assert stats_as_alice(closed_server)["unauthorized"] >= 4


def stats_as_alice(srv) -> dict:
    with V1Conn(srv.port) as c:
        c.hello()
        c.request(b"AUT", _aut("alice", ALICE_SECRET))
        return c.json(b"STA")


def test_client_libraries_authenticate(closed_server):
    from broker import AsyncClient, Client
    from broker.client.errors import Unauthorized
    port = closed_server.port
    with Client("127.0.0.1", port, user="alice", secret=ALICE_SECRET, reconnect=False) as c:
        assert c.publish("chat.lib", b"sync") == 0
    with pytest.raises(Unauthorized):
        Client("127.0.0.1", port, user="alice", secret="wrong", reconnect=False)
    with pytest.raises(Unauthorized):
        with Client("127.0.0.1", port, reconnect=False) as c:  # anonymous: refused
            c.publish("chat.lib", b"nope")

    async def go():
        async with AsyncClient("127.0.0.1", port, user="bob", secret=BOB_SECRET,
                               reconnect=False) as c:
            sub = await c.subscribe("chat.lib", "oldest")
            msg = await asyncio.wait_for(sub.__anext__(), 10)
            with pytest.raises(Unauthorized):
                await c.publish("chat.lib", b"bob may not")
            return msg.value

    assert asyncio.run(go()) == b"sync"


# -- v0 under auth ---------------------------------------------------------------------

def test_v0_refused_when_anonymous_is_off(closed_server):
    port = closed_server.port
    with V0Client(port) as c:
        c.send_raw(v0frame(b"REG"))
        c.wait_closed(5)  # no id: refused
    with V0Client(port) as c:
        c.send_raw(v0frame(b"CID legacy") + pub_frame(b"public.v0", b"refused"))
        c.wait_closed(5)
    assert "unauthenticated v0 client refused" in closed_server.log_text()
    assert "public.v0" not in _admin_topics(closed_server)


def test_anonymous_allowed_with_its_permissions(server, users):
    srv = server("--auth-file", str(users[1]))
    port = srv.port
    # v0: a prototype producer and consumer, restricted to public.*.
    with V0Client(port) as cons:
        cons.cid("legacy-consumer")
        cons.send_raw(v0frame(b"SUB public.v0") + v0frame(b"SET public.v0 0")
                      + v0frame(b"SUB chat.v0"))
        with V0Client(port) as prod:
            reg = prod.reg()
            prod.cid(reg)
            prod.pub(b"public.v0", b"hello from v0")
            prod.pub(b"chat.v0", b"not allowed")
            prod.send_close_frame()
            prod.wait_closed(5)
        assert cons.read_deliveries(1) == [(b"public.v0", b"hello from v0")]
        cons.expect_silence(0.3)
    log = srv.log_text()
    assert "anonymous may not publish to chat.v0" in log
    assert "anonymous may not subscribe to chat.v0" in log
    # v1 without AUT: the same anonymous permissions.
    with V1Conn(port) as c:
        c.hello()
        assert c.publish("public.v1", [b"anon"]) == (0, 1)
        expect_err(c, c.send(b"PUB", pub("chat.v1", [b"x"])), UNAUTHORIZED)
        expect_err(c, c.send(b"SUB", spec("chat.v0", OLDEST)), UNAUTHORIZED)
        c.request(b"AUT", _aut("alice", ALICE_SECRET))  # then alice's
        assert c.publish("chat.v1", [b"alice"]) == (0, 1)
    info = _admin_topics(srv)
    assert info.get("chat.v0", {"messages": 0})["messages"] == 0
    assert info["public.v0"]["messages"] == 1


def test_unauthenticated_connection_cannot_take_over_a_client_id(closed_server):
    """HEL with someone else's client id, without AUT, must not stop their
    deliveries (binding an id supersedes its connection)."""
    port = closed_server.port
    with V1Conn(port) as alice, V1Conn(port) as mallory, V1Conn(port) as prod:
        alice.hello(b"alice-consumer")
        alice.request(b"AUT", _aut("alice", ALICE_SECRET))
        rid, _ = alice.subscribe("chat.orders", OLDEST)
        mallory.hello(b"alice-consumer")  # no secret
        expect_err(mallory, mallory.send(b"CMT", cmt("chat.orders", 0)), UNAUTHORIZED)
        prod.hello()
        prod.request(b"AUT", _aut("alice", ALICE_SECRET))
        prod.publish("chat.orders", [b"o1"])
        assert [m[2] for m in alice.read_messages(1, rid, timeout=5)] == [b"o1"]
        # Once authenticated, the id is claimed (the documented behaviour).
        mallory.request(b"AUT", _aut("bob", BOB_SECRET))
        prod.publish("chat.orders", [b"o2"])
        alice.expect_silence(0.5)


def test_v0_set_needs_subscribe_permission(server, users):
    """v0 SET stores a client's offset: refused (and logged) on a topic the
    anonymous user may not read, like a v1 CMT."""
    srv = server("--auth-file", str(users[1]))
    with V1Conn(srv.port) as alice:
        alice.hello(b"alice-c")
        alice.request(b"AUT", _aut("alice", ALICE_SECRET))
        alice.publish("chat.room", [b"a", b"b", b"c"])
        alice.request(b"CMT", cmt("chat.room", 1))
    with V0Client(srv.port) as anon:
        anon.cid(b"alice-c")
        anon.send_raw(v0frame(b"SET chat.room -1") + v0frame(b"SET public.x 0")
                      + v0frame(b"SUB public.x") + pub_frame(b"public.x", b"sync"))
        # Frames are handled in order: once "sync" comes back, the SETs were.
        assert anon.read_deliveries(1) == [(b"public.x", b"sync")]
    with V1Conn(srv.port) as c:
        c.hello()
        c.request(b"AUT", _aut("alice", ALICE_SECRET))
        offsets = {(o["client_id"], o["topic"]): o["offset"] for o in c.json(b"OFS", s(""))}
    assert offsets[("alice-c", "chat.room")] == 1
    assert ("alice-c", "public.x") in offsets  # the permitted SET went through
    assert "anonymous may not set an offset on chat.room" in srv.log_text()


# -- TLS ------------------------------------------------------------------------------

TLS_READ_TIMEOUT = 2.0


@pytest.fixture
def tls_server(server, users, tls_files):
    return server("--tls-cert", tls_files["cert"], "--tls-key", tls_files["key"],
                  "--auth-file", str(users[1]), "--read-timeout", str(TLS_READ_TIMEOUT))


def _context(cafile: str) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=cafile)


def test_tls_clients_blocking_and_async(tls_server, tls_files):
    from broker import AsyncClient, Client
    port = tls_server.port
    with Client("127.0.0.1", port, ssl=_context(tls_files["ca"]), reconnect=False) as c:
        assert c.publish("public.tls", b"over tls") == 0
        sub = c.subscribe("public.tls", "oldest")
        assert next(iter(sub)).value == b"over tls"

    async def go():
        async with AsyncClient("127.0.0.1", port, ssl=_context(tls_files["ca"]), user="alice",
                               secret=ALICE_SECRET, reconnect=False) as c:
            await c.publish("chat.tls", b"async over tls")
            sub = await c.subscribe("chat.tls", "oldest")
            return (await asyncio.wait_for(sub.__anext__(), 10)).value

    assert asyncio.run(go()) == b"async over tls"
    # The raw socket really is TLS: the certificate is ours.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with _context(tls_files["ca"]).wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            der = tls.getpeercert(binary_form=True)
    from cryptography import x509
    pem = Path(tls_files["cert"]).read_bytes()
    assert x509.load_der_x509_certificate(der) == x509.load_pem_x509_certificate(pem)


def test_tls_cli(tls_server, tls_files, impl, tmp_path):
    port = str(tls_server.port)
    common = ["--port", port, "--tls-ca", tls_files["ca"]]
    proc = _cli(impl, "pub", *common, "--user", "alice", "--secret", ALICE_SECRET,
                "chat.cli", input_=b"one\ntwo\nthree\n", cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr.decode()
    # The secret through the environment, as docs/security.md recommends.
    proc = subprocess.run(
        [sys.executable, "-m", "broker", "sub", *common, "--user", "bob", "chat.cli",
         "--from", "oldest", "--count", "3"],
        env=dict(impl_env(impl), PYLOGSTREAMS_SECRET=BOB_SECRET), capture_output=True,
        timeout=60, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == b"one\ntwo\nthree\n"
    # Wrong CA: the CLI fails cleanly (an error message, not a traceback).
    proc = _cli(impl, "topics", "--port", port, "--tls-ca", tls_files["other_ca"],
                cwd=str(tmp_path), timeout=60)
    assert proc.returncode != 0
    err = proc.stderr.decode()
    assert "Traceback" not in err and ("CERTIFICATE_VERIFY_FAILED" in err or "certificate" in err), err
    # Plaintext CLI against the TLS port: fails, no hang.
    proc = _cli(impl, "topics", "--port", port, cwd=str(tmp_path), timeout=60)
    assert proc.returncode != 0


def test_tls_with_the_documented_openssl_certificate(server, tmp_path):
    """The self-signed certificate command of docs/security.md works as shown."""
    import shutil
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command")
    doc = (Path(__file__).resolve().parent.parent / "docs" / "security.md").read_text()
    m = re.search(r"```sh\n(openssl req -x509 .*?)\n```", doc, re.S)
    assert m, "the openssl command is gone from docs/security.md"
    argv = m[1].replace("\\\n", " ").split()
    argv = [a.strip('"') for a in argv]
    # Re-join the quoted -addext value the shell would have kept whole.
    i = argv.index("-addext")
    argv[i + 1] = argv[i + 1].strip('"')
    proc = subprocess.run(argv, cwd=str(tmp_path), capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()
    srv = server("--tls-cert", str(tmp_path / "server.pem"), "--tls-key", str(tmp_path / "server.key"))
    from broker import Client
    for host in ("127.0.0.1", "localhost"):
        with Client(host, srv.port, ssl=_context(str(tmp_path / "server.pem")), reconnect=False) as c:
            assert c.publish("t", b"ok") >= 0


def test_plaintext_client_against_tls_port(tls_server, tls_files):
    port = tls_server.port
    # Plain v1 and v0 first frames, and a TLS record that promises more
    # handshake bytes than it sends (a slow handshake: --read-timeout bounds it).
    for attempt in (frame(b"HEL", 1, hel(1, b"plain")), v0frame(b"REG"),
                    b"\x16\x03\x01\x00\x40junk"):
        t0 = time.monotonic()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(attempt)
            sock.settimeout(10)
            got = b""
            try:
                while True:
                    data = sock.recv(4096)
                    if not data:
                        break
                    got += data
            except ConnectionError:
                pass
            # Nothing of our protocol comes back, only (maybe) a TLS alert.
            assert b"RES" not in got and len(got) < 100, got[:100]
        assert time.monotonic() - t0 < TLS_READ_TIMEOUT + 3
    # The broker is still up and serves TLS.
    from broker import Client
    with Client("127.0.0.1", port, ssl=_context(tls_files["ca"]), reconnect=False) as c:
        c.ping()
    # A client that does not trust the certificate refuses to talk.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with pytest.raises(ssl.SSLCertVerificationError):
            _context(tls_files["other_ca"]).wrap_socket(raw, server_hostname="127.0.0.1")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with pytest.raises(ssl.SSLCertVerificationError):  # wrong name
            _context(tls_files["ca"]).wrap_socket(raw, server_hostname="broker.example.com")
    assert tls_server.running()


# -- connection limits ----------------------------------------------------------------------

def _connect_from(source: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def _served(sock: socket.socket) -> bool:
    """HEL gets its RES (served), or the broker closes the connection (refused)."""
    try:
        sock.sendall(frame(b"HEL", 1, hel(1, b"")))
        data = sock.recv(100)
    except ConnectionError:
        return False
    return data[4:7] == b"RES"


def test_connection_limits_total_and_per_address(server):
    srv = server("--max-connections", "5", "--max-connections-per-ip", "3")
    port = srv.port
    a = [_connect_from("127.0.0.1", port) for _ in range(3)]
    assert all(_served(x) for x in a)
    a_over = _connect_from("127.0.0.1", port)
    assert not _served(a_over), "a 4th connection from one address was served"
    b = [_connect_from("127.0.0.2", port) for _ in range(2)]
    assert all(_served(x) for x in b), "another address was refused below the total limit"
    b_over = _connect_from("127.0.0.2", port)
    assert not _served(b_over), "a 6th connection was served with --max-connections 5"
    log = srv.log_text()
    assert "(--max-connections-per-ip)" in log and "(--max-connections)" in log
    # Closing one frees its slot.
    a[0].close()
    deadline = time.monotonic() + 10
    while True:
        again = _connect_from("127.0.0.1", port)
        if _served(again):
            break
        again.close()
        assert time.monotonic() < deadline, "the freed slot was never reused"
        time.sleep(0.05)
    for x in a[1:] + b + [a_over, b_over, again]:
        x.close()
    deadline = time.monotonic() + 10
    while True:
        st = stats(port)
        if st["connections"] == 1:
            break
        assert time.monotonic() < deadline, st
        time.sleep(0.05)
    assert st["refused_connections"] >= 2


def test_frame_size_limit(server):
    srv = server("--max-frame-bytes", "1024")
    with V1Conn(srv.port) as c:
        c.hello()
        body = pub("t", [b"x" * (1024 - 7 - 2 - 1 - 4 - 8)])
        assert 7 + len(body) == 1024
        c.publish("t", [b"x" * (1024 - 7 - 2 - 1 - 4 - 8)])  # at the limit: accepted
        c.send_raw(frame(b"PUB", 9, pub("t", [b"x" * (1024 - 7 - 2 - 1 - 4 - 8 + 1)])))
        frames = c.wait_closed(5)
    assert [(k, struct.unpack_from(">H", p)[0]) for k, _r, p in frames] == [(b"ERR", FRAME_TOO_LARGE)]
    assert [len(v) for _, v in read_topic(srv.port, "t")] == [1024 - 22]


# -- the default bind -----------------------------------------------------------------------

def _listening(port: int) -> list[str]:
    """Local addresses with a listening TCP socket on ``port`` (from /proc/net/tcp*)."""
    out = []
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(path).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state = fields[1], fields[3]
            addr, p = local.split(":")
            if state == "0A" and int(p, 16) == port:  # 0A: LISTEN
                if len(addr) == 8:
                    out.append(socket.inet_ntoa(struct.pack("<I", int(addr, 16))))
                else:
                    out.append(addr)
    return out


def test_default_bind_is_loopback(impl, tmp_path):
    from broker.config import Config
    assert Config().host == "127.0.0.1"
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker", "serve", "--port", "0", "--data-dir",
         str(tmp_path / "data"), "--metrics-port", "0"],
        env=impl_env(impl), stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(tmp_path))
    try:
        line = proc.stdout.readline().decode()
        m = re.match(r"pylogstreams serving on (\S+):(\d+) ", line)
        assert m, line
        assert m[1] == "127.0.0.1"
        port = int(m[2])
        assert _listening(port) == ["127.0.0.1"]
        # Not reachable on the machine's other addresses.
        others = [a for a in _local_addresses() if not a.startswith("127.")]
        for addr in others:
            with pytest.raises(OSError):
                socket.create_connection((addr, port), timeout=2).close()
        Bystander(port).close()  # but served on loopback
    finally:
        proc.terminate()
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    mport = re.search(rb"metrics on http://([\d.]+):(\d+)/metrics", err)
    assert mport and mport[1] == b"127.0.0.1", err[-2000:]


def _local_addresses() -> list[str]:
    out = []
    try:
        text = Path("/proc/net/fib_trie").read_text()
    except OSError:
        return out
    for m in re.finditer(r"\|-- ([\d.]+)\n\s+/32 host LOCAL", text):
        out.append(m[1])
    return sorted(set(out))
