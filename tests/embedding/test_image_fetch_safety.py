"""Tests for the safety of embedding.images fetching against hostile catalog rows.

Every test is bounded in time: misbehaving servers and filesystems are local
(real loopback sockets, a Beam FileSystem registered for a test scheme), and
each fetch runs with a 1-2 s deadline whose overrun the test measures.
"""

import contextlib
import datetime
import io
import os
import socket
import ssl
import threading
import time

import pytest
from apache_beam.io.localfilesystem import LocalFileSystem
from PIL import Image

from embedding import images
from embedding.images import ImageFetchError, fetch_image_bytes, load_image, refused_address_reason
from schemas.rejected import IMAGE_FETCH_FAILED

HINT = "(pass --allow-private-image-hosts for intranet catalogs)"


def png_bytes():
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (255, 0, 0)).save(buf, "PNG")
    return buf.getvalue()


PNG = png_bytes()


# Scheduling slack for shared, loaded CI machines. The failures these bounds guard against
# (a FIFO, a dripping server, a hung store) take 30 s or never end, so the slack does not hide them.
SLACK_S = 2.0


@contextlib.contextmanager
def within(seconds):
    """Asserts the block (exceptions included) took less than ``seconds`` (+ SLACK_S)."""
    started = time.monotonic()
    yield
    elapsed = time.monotonic() - started
    assert elapsed < seconds + SLACK_S, f"took {elapsed:.2f} s, limit {seconds} s + {SLACK_S} s slack"


def refused(info):
    assert info.value.reason == IMAGE_FETCH_FAILED
    return str(info.value)


# ------------------------------------------------------------------ classifier


@pytest.mark.parametrize(
    "ip, reason",
    [
        ("127.0.0.1", "a loopback address"),
        ("127.9.9.9", "a loopback address"),
        ("10.1.2.3", "a private address"),
        ("172.16.0.1", "a private address"),
        ("172.31.255.255", "a private address"),
        ("192.168.1.1", "a private address"),
        ("169.254.169.254", "a cloud metadata address"),
        ("169.254.170.2", "a cloud metadata address"),
        ("169.254.1.1", "a link-local address"),
        ("100.64.0.1", "a shared (CGNAT) address"),
        ("100.127.255.255", "a shared (CGNAT) address"),
        ("0.0.0.0", "an unspecified address"),
        ("224.0.0.1", "a multicast address"),
        ("240.0.0.1", "a reserved address"),
        ("255.255.255.255", "a reserved address"),
        ("192.0.2.1", "a non-public address"),  # TEST-NET-1 (documentation)
        ("::1", "a loopback address"),
        ("::", "an unspecified address"),
        ("fe80::1", "a link-local address"),
        ("fe80::1%eth0", "a link-local address"),
        ("fc00::1", "a private address"),
        ("fd12:3456::1", "a private address"),
        ("fd00:ec2::254", "a cloud metadata address"),
        ("ff02::1", "a multicast address"),
        ("2001:db8::1", "a non-public address"),
        ("::ffff:127.0.0.1", "a loopback address (IPv4-mapped 127.0.0.1)"),
        ("::ffff:169.254.169.254", "a cloud metadata address (IPv4-mapped 169.254.169.254)"),
        ("::ffff:10.0.0.1", "a private address (IPv4-mapped 10.0.0.1)"),
        ("::127.0.0.1", "a loopback address (IPv4-compatible 127.0.0.1)"),
        ("::8.8.8.8", "a reserved address"),  # deprecated IPv4-compatible form
        ("64:ff9b::10.0.0.1", "a private address (NAT64 10.0.0.1)"),
        ("2002:7f00:1::", "a loopback address (6to4 127.0.0.1)"),
    ],
)
def test_refused_addresses(ip, reason):
    assert refused_address_reason(ip) == reason


@pytest.mark.parametrize(
    "ip",
    [
        "8.8.8.8",
        "1.1.1.1",
        "172.32.0.1",  # just past 172.16.0.0/12
        "100.128.0.1",  # just past 100.64.0.0/10
        "2606:4700::1111",
        "::ffff:8.8.8.8",
        "64:ff9b::8.8.8.8",  # what DNS64 hands an IPv6-only worker for a public host
    ],
)
def test_public_addresses(ip):
    assert refused_address_reason(ip) is None


def test_classifier_takes_ipaddress_objects_and_rejects_names():
    import ipaddress

    assert refused_address_reason(ipaddress.ip_address("127.0.0.1")) == "a loopback address"
    with pytest.raises(ValueError):
        refused_address_reason("metadata.google.internal")


# ------------------------------------------------------------------ arguments


@pytest.mark.parametrize("timeout", [0, -1, None, float("inf"), float("nan"), True, "5"])
def test_bad_timeout_is_a_programming_error(tmp_path, timeout):
    with pytest.raises(ValueError):
        fetch_image_bytes(str(tmp_path / "x.png"), timeout=timeout)


@pytest.mark.parametrize("root", ["", "  ", 3])
def test_bad_image_root_is_a_programming_error(tmp_path, root):
    with pytest.raises(ValueError):
        fetch_image_bytes(str(tmp_path / "x.png"), image_root=root)


def test_positional_parameters_still_work(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(PNG)
    assert fetch_image_bytes(str(path), 10_000, 5) == PNG
    assert load_image(str(path), (2, 2), 1_000, 10_000).shape == (2, 2, 3)


# ------------------------------------------------------------ non-regular files


def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    for uri in (str(fifo), "file://" + str(fifo)):
        with within(1.0), pytest.raises(ImageFetchError) as info:
            fetch_image_bytes(uri, timeout=2)
        assert "not a regular file (FIFO)" in refused(info)
    with within(1.0), pytest.raises(ImageFetchError):
        load_image(str(fifo), (8, 8), timeout=2)


def test_symlink_to_a_fifo_is_refused_and_to_a_file_followed(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "to-pipe.png").symlink_to(tmp_path / "pipe")
    with within(1.0), pytest.raises(ImageFetchError) as info:
        fetch_image_bytes(str(tmp_path / "to-pipe.png"), timeout=2)
    assert "FIFO" in refused(info)

    (tmp_path / "real.png").write_bytes(PNG)
    (tmp_path / "to-real.png").symlink_to(tmp_path / "real.png")
    assert fetch_image_bytes(str(tmp_path / "to-real.png"), timeout=2) == PNG


def test_fifo_swapped_in_after_the_stat_is_caught_after_opening(tmp_path, monkeypatch):
    # The stat says "regular file" (as if the FIFO appeared just after it):
    # the open must not block, and fstat must catch what was really opened.
    regular = tmp_path / "regular.png"
    regular.write_bytes(PNG)
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    real_stat = os.stat
    monkeypatch.setattr(images.os, "stat", lambda path, *a, **k: real_stat(regular))
    with within(1.0), pytest.raises(ImageFetchError) as info:
        fetch_image_bytes(str(fifo), timeout=2)
    assert "not a regular file (FIFO)" in refused(info)


def test_directory_is_refused(tmp_path):
    with within(1.0), pytest.raises(ImageFetchError) as info:
        fetch_image_bytes(str(tmp_path), timeout=2)
    assert "not a regular file (directory)" in refused(info)


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_character_device_is_refused():
    with within(1.0), pytest.raises(ImageFetchError) as info:
        fetch_image_bytes("/dev/zero", timeout=2)
    assert "not a regular file (character device)" in refused(info)


# ----------------------------------------------------------------- http servers


class RawServer:
    """A real TCP server on a loopback address whose replies a test scripts byte by byte.

    ``reply(server, conn, path)`` runs on its own thread per connection, after
    the request head is read; ``requests`` keeps every request head.
    """

    def __init__(self, reply, host="127.0.0.1", tls=None):
        self.reply = reply
        self.tls = tls
        self.requests = []
        self.stopping = threading.Event()
        self.listener = socket.create_server((host, 0))
        self.listener.settimeout(0.05)
        self.host, self.port = self.listener.getsockname()[:2]
        self.threads = [threading.Thread(target=self._accept_loop, daemon=True)]
        self.threads[0].start()

    def url(self, path, scheme="http", host=None):
        return f"{scheme}://{host or self.host}:{self.port}{path}"

    def _accept_loop(self):
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _serve(self, conn):
        try:
            conn.settimeout(5)
            if self.tls is not None:
                conn = self.tls.wrap_socket(conn, server_side=True)
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                head += chunk
            head = head.decode("latin-1")
            self.requests.append(head)
            self.reply(self, conn, head.split(" ")[1])
        except OSError:  # the client gave up or failed the TLS handshake
            pass
        finally:
            conn.close()

    def close(self):
        self.stopping.set()
        for thread in self.threads:
            thread.join(5)
        self.listener.close()


@pytest.fixture
def serve(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    servers = []

    def start(reply, host="127.0.0.1", tls=None):
        server = RawServer(reply, host, tls)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def ok(body=PNG):
    def reply(server, conn, path):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)

    return reply


def redirect(location, code=302):
    def reply(server, conn, path):
        conn.sendall(
            f"HTTP/1.1 {code} Moved\r\nLocation: {location}\r\nContent-Length: 0\r\n\r\n".encode()
        )

    return reply


def routes(table):
    def reply(server, conn, path):
        handler = table.get(path)
        if handler is None:
            conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        else:
            handler(server, conn, path)

    return reply


def drip(prefix, byte, interval, count):
    """Sends ``prefix``, then ``byte`` every ``interval`` s: each read is quick, the whole never ends."""

    def reply(server, conn, path):
        conn.sendall(prefix)
        for _ in range(count):
            if server.stopping.wait(interval):
                return
            conn.sendall(byte)

    return reply


def silent(server, conn, path):
    server.stopping.wait(30)


def idle_listener():
    """A listening socket that never accepts: a connection to it would sit in the backlog."""
    return socket.create_server(("127.0.0.1", 0))


def assert_never_connected(listener):
    listener.setblocking(False)
    with pytest.raises(BlockingIOError):
        conn, _ = listener.accept()
        conn.close()


# ------------------------------------------------------------ http: deadlines


def test_headers_sent_slowly_cannot_outlast_the_deadline(serve):
    server = serve(drip(b"HTTP/1.1 200 OK\r\n", b"X", 0.3, 100))
    started = time.monotonic()
    with within(2.0), pytest.raises(ImageFetchError) as info:
        fetch_image_bytes(server.url("/img.png"), timeout=1, allow_private_hosts=True)
    assert time.monotonic() - started > 0.9  # it was the deadline, not another failure
    assert "timed out after 1 s" in refused(info)
    assert len(server.requests) == 1


def test_body_sent_slowly_cannot_outlast_the_deadline(serve):
    server = serve(drip(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n", b"x", 0.1, 1000))
    with within(2.0), pytest.raises(ImageFetchError) as info:
        fetch_image_bytes(server.url("/img.png"), timeout=1, allow_private_hosts=True)
    assert "timed out" in refused(info)


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_server_that_never_answers(serve, scheme):
    # For https the TLS handshake is what never completes.
    server = serve(silent) if scheme == "http" else None
    if server is None:
        listener = socket.create_server(("127.0.0.1", 0))  # accepts via backlog, never speaks
        url = f"https://127.0.0.1:{listener.getsockname()[1]}/img.png"
    else:
        url = server.url("/img.png")
    try:
        with within(2.0), pytest.raises(ImageFetchError) as info:
            fetch_image_bytes(url, timeout=1, allow_private_hosts=True)
        assert "timed out" in refused(info)
    finally:
        if server is None:
            listener.close()


def test_plain_http_fetch_and_request_shape(serve):
    server = serve(ok())
    assert fetch_image_bytes(server.url("/a b/ä.png?x=1"), timeout=2, allow_private_hosts=True) == PNG
    request_line, *headers = server.requests[0].split("\r\n")
    # Unsafe characters are percent-encoded as a browser would.
    assert request_line == "GET /a%20b/%C3%A4.png?x=1 HTTP/1.1"
    assert f"Host: 127.0.0.1:{server.port}" in headers
    assert "User-Agent: catalog-index-image-fetch/1.0" in headers


# ------------------------------------------------------------ http: addresses


@pytest.mark.parametrize(
    "template, shown",
    [
        ("http://127.0.0.1:{port}/img.png", "127.0.0.1 is a loopback address"),
        ("http://localhost:{port}/img.png", "localhost ("),
        ("http://127.1:{port}/img.png", "127.1 (127.0.0.1) is a loopback address"),
        ("http://[::ffff:127.0.0.1]:{port}/img.png", "::ffff:127.0.0.1 is a loopback address (IPv4-mapped 127.0.0.1)"),
        ("http://0.0.0.0:{port}/img.png", "0.0.0.0 is an unspecified address"),
        ("https://127.0.0.1:{port}/img.png", "127.0.0.1 is a loopback address"),
    ],
)
def test_loopback_is_refused_without_connecting(template, shown):
    listener = idle_listener()
    try:
        url = template.format(port=listener.getsockname()[1])
        with within(1.0), pytest.raises(ImageFetchError) as info:
            fetch_image_bytes(url, timeout=2)
        message = refused(info)
        assert "refused: image host " + shown in message
        assert HINT in message
        assert_never_connected(listener)
    finally:
        listener.close()


def test_exact_refusal_message():
    listener = idle_listener()
    try:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/img.png"
        with pytest.raises(ImageFetchError) as info:
            fetch_image_bytes(url, timeout=2)
        assert str(info.value) == (
            f"cannot fetch image {url!r}: refused: image host 127.0.0.1 is a loopback address {HINT}"
        )
    finally:
        listener.close()


def test_loopback_is_allowed_with_allow_private_hosts(serve):
    server = serve(ok())
    assert fetch_image_bytes(server.url("/img.png"), timeout=2, allow_private_hosts=True) == PNG
    arr = load_image(server.url("/img.png"), (2, 2), timeout=2, allow_private_hosts=True)
    assert arr.shape == (2, 2, 3)


@pytest.fixture
def fake_dns(monkeypatch):
    """Names in ``table`` resolve to the given IPs (or, if callable, to what it returns)."""
    table, calls = {}, []
    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        calls.append(host)
        answer = table.get(host)
        if answer is None:
            return real(host, port, *args, **kwargs)
        ips = answer() if callable(answer) else answer
        return [info for ip in ips for info in real(ip, port, *args, **kwargs)]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return table, calls


def test_every_resolved_address_is_checked(fake_dns):
    table, _ = fake_dns
    table["mixed.example"] = ["8.8.8.8", "10.0.0.7"]
    with within(1.0), pytest.raises(ImageFetchError) as info:
        fetch_image_bytes("http://mixed.example/img.png", timeout=2)
    assert "image host mixed.example (10.0.0.7) is a private address" in refused(info)


def test_metadata_host_is_refused(fake_dns):
    table, _ = fake_dns
    table["metadata.google.internal"] = ["169.254.169.254"]
    with within(1.0), pytest.raises(ImageFetchError) as info:
        fetch_image_bytes("http://metadata.google.internal/computeMetadata/v1/", timeout=2)
    assert "metadata.google.internal (169.254.169.254) is a cloud metadata address" in refused(info)


def test_host_is_resolved_once_and_kept_in_the_host_header(serve, fake_dns):
    table, calls = fake_dns
    table["images.test"] = ["127.0.0.1"]
    server = serve(ok())
    url = server.url("/img.png", host="images.test")
    assert fetch_image_bytes(url, timeout=2, allow_private_hosts=True) == PNG
    assert calls == ["images.test"]  # no second lookup that could answer differently
    assert f"Host: images.test:{server.port}" in server.requests[0].split("\r\n")


def test_slow_dns_cannot_outlast_the_deadline(fake_dns):
    table, _ = fake_dns
    release = threading.Event()
    table["slow.example"] = lambda: [] if release.wait(10) else []
    try:
        with within(2.0), pytest.raises(ImageFetchError) as info:
            fetch_image_bytes("http://slow.example/img.png", timeout=1)
        assert "timed out after 1 s" in refused(info)
    finally:
        release.set()


# ----------------------------------------------------------------- http: TLS


def self_signed(tmp_path, name):
    """A self-signed certificate for DNS name ``name``: (cert path, key path)."""
    pytest.importorskip("cryptography")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(cert_path), str(key_path)


def test_https_uses_the_hostname_for_sni_and_certificate(tmp_path, serve, fake_dns, monkeypatch):
    cert, key = self_signed(tmp_path, "images.test")
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    sni = []
    server_ctx.sni_callback = lambda sslobj, name, ctx: sni.append(name)
    client_ctx = ssl.create_default_context(cafile=cert)
    monkeypatch.setattr(images, "_ssl_context", lambda: client_ctx)
    table, _ = fake_dns
    table["images.test"] = ["127.0.0.1"]
    table["other.test"] = ["127.0.0.1"]
    server = serve(ok(), tls=server_ctx)

    url = server.url("/img.png", scheme="https", host="images.test")
    assert fetch_image_bytes(url, timeout=2, allow_private_hosts=True) == PNG
    assert sni == ["images.test"]
    assert f"Host: images.test:{server.port}" in server.requests[0].split("\r\n")

    # Same address, another name: the certificate does not match it.
    with within(2.0), pytest.raises(ImageFetchError) as info:
        fetch_image_bytes(
            server.url("/img.png", scheme="https", host="other.test"), timeout=2, allow_private_hosts=True
        )
    assert "certificate" in refused(info).lower()


# -------------------------------------------------------------- http: redirects


def test_redirect_to_loopback_is_refused(serve, monkeypatch):
    # The first server listens on 127.0.0.2, which the patched classifier
    # calls public; the redirect target goes through the real classifier.
    real = images.refused_address_reason
    monkeypatch.setattr(images, "refused_address_reason", lambda ip: None if ip == "127.0.0.2" else real(ip))
    target = idle_listener()
    try:
        location = f"http://127.0.0.1:{target.getsockname()[1]}/secret"
        server = serve(redirect(location), host="127.0.0.2")
        with within(1.5), pytest.raises(ImageFetchError) as info:
            fetch_image_bytes(server.url("/img.png"), timeout=2)
        message = refused(info)
        assert f"(redirected to {location!r}): refused: image host 127.0.0.1 is a loopback address" in message
        assert HINT in message
        assert len(server.requests) == 1
        assert_never_connected(target)
    finally:
        target.close()


def test_redirects_are_followed_up_to_five(serve):
    table = {f"/r{n}": redirect(f"/r{n - 1}") for n in range(1, 7)}
    table["/r0"] = ok()
    server = serve(routes(table))
    assert fetch_image_bytes(server.url("/r5"), timeout=2, allow_private_hosts=True) == PNG
    assert len(server.requests) == 6

    server.requests.clear()
    with within(2.0), pytest.raises(ImageFetchError) as info:
        fetch_image_bytes(server.url("/r6"), timeout=2, allow_private_hosts=True)
    assert "more than 5 redirects" in refused(info)
    assert len(server.requests) == 6  # /r6 ... /r1; the sixth redirect is not followed


def test_absolute_and_cross_host_redirects_are_followed(serve, fake_dns):
    table, _ = fake_dns
    table["images.test"] = ["127.0.0.1"]
    target = serve(ok())
    server = serve(redirect(target.url("/img.png", host="images.test"), code=301))
    assert fetch_image_bytes(server.url("/old.png"), timeout=2, allow_private_hosts=True) == PNG
    assert f"Host: images.test:{target.port}" in target.requests[0].split("\r\n")


@pytest.mark.parametrize("location", ["file:///etc/passwd", "gs://bucket/img.png", "ftp://example.com/x"])
def test_redirect_to_another_scheme_is_refused(serve, location):
    server = serve(redirect(location))
    with within(1.5), pytest.raises(ImageFetchError) as info:
        fetch_image_bytes(server.url("/img.png"), timeout=2, allow_private_hosts=True)
    message = refused(info)
    assert f"refused redirect to {location!r}" in message
    assert "only http and https" in message


def test_redirect_without_location_fails(serve):
    server = serve(lambda srv, conn, path: conn.sendall(b"HTTP/1.1 302 Found\r\nContent-Length: 0\r\n\r\n"))
    with pytest.raises(ImageFetchError) as info:
        fetch_image_bytes(server.url("/img.png"), timeout=2, allow_private_hosts=True)
    assert "HTTP 302 without a Location" in refused(info)


# ------------------------------------------------------------- local image_root


@pytest.fixture
def local_tree(tmp_path):
    """tmp/images/a.png inside the root, tmp/secret.png and tmp/images-private/x.png outside."""
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.png").write_bytes(PNG)
    (tmp_path / "secret.png").write_bytes(PNG)
    (tmp_path / "images-private").mkdir()
    (tmp_path / "images-private" / "x.png").write_bytes(PNG)
    return tmp_path, root


@pytest.mark.parametrize("root_form", ["{root}", "{root}/", "file://{root}/"])
def test_local_image_inside_the_root_is_read(local_tree, root_form):
    _, root = local_tree
    image_root = root_form.format(root=root)
    for uri in (str(root / "sub" / "a.png"), "file://" + str(root / "sub" / "a.png")):
        assert fetch_image_bytes(uri, timeout=2, image_root=image_root) == PNG


@pytest.mark.parametrize(
    "relative",
    [
        "secret.png",
        "images/../secret.png",
        "images/sub/../../secret.png",
        "images-private/x.png",  # shares the root's name as a string prefix
    ],
)
def test_local_image_outside_the_root_is_refused(local_tree, relative):
    tmp_path, root = local_tree
    with within(1.0), pytest.raises(ImageFetchError) as info:
        fetch_image_bytes(str(tmp_path) + "/" + relative, timeout=2, image_root=str(root))
    message = refused(info)
    assert message.startswith("refused: image ")
    assert f"outside the image root {str(root)!r}" in message


def test_symlink_in_the_root_cannot_lead_out(local_tree):
    tmp_path, root = local_tree
    (root / "escape.png").symlink_to(tmp_path / "secret.png")
    (root / "escape-dir").symlink_to(tmp_path)
    for uri in (root / "escape.png", root / "escape-dir" / "secret.png"):
        with pytest.raises(ImageFetchError) as info:
            fetch_image_bytes(str(uri), timeout=2, image_root=str(root))
        assert "outside the image root" in refused(info)
    # Without a root, the same links are ordinary symlinks and are followed.
    assert fetch_image_bytes(str(root / "escape.png"), timeout=2) == PNG


def test_symlinks_within_the_root_are_fine(local_tree):
    tmp_path, root = local_tree
    (root / "alias.png").symlink_to(root / "sub" / "a.png")
    (tmp_path / "root-link").symlink_to(root)
    assert fetch_image_bytes(str(root / "alias.png"), timeout=2, image_root=str(root)) == PNG
    # The root itself may be given through a symlink.
    assert fetch_image_bytes(str(root / "sub" / "a.png"), timeout=2, image_root=str(tmp_path / "root-link")) == PNG


def test_fifo_inside_the_root_is_still_refused(local_tree):
    _, root = local_tree
    os.mkfifo(root / "pipe.png")
    with within(1.0), pytest.raises(ImageFetchError) as info:
        fetch_image_bytes(str(root / "pipe.png"), timeout=2, image_root=str(root))
    assert "FIFO" in refused(info)


def test_local_image_with_an_object_store_root_is_refused(local_tree):
    _, root = local_tree
    with pytest.raises(ImageFetchError) as info:
        fetch_image_bytes(str(root / "sub" / "a.png"), timeout=2, image_root="gs://bucket/images/")
    assert "outside the image root 'gs://bucket/images/'" in refused(info)


def test_image_root_does_not_apply_to_http(serve, local_tree):
    _, root = local_tree
    server = serve(ok())
    assert fetch_image_bytes(server.url("/img.png"), timeout=2, allow_private_hosts=True, image_root=str(root)) == PNG


# ---------------------------------------------------------- other filesystems

STORE = "imgfetchtest"  # a scheme no other test uses


class _StoreFileSystem(LocalFileSystem):
    """A Beam filesystem for ``imgfetchtest://`` backed by a local folder (as tests/fake_gcs.py).

    Defining the subclass registers it with Beam's FileSystems. When ``gate``
    is an Event, open() waits on it first: a remote store that hangs.
    """

    root = None
    gate = None

    @classmethod
    def scheme(cls):
        return STORE

    def open(self, path, *args, **kwargs):  # pylint: disable=arguments-differ
        gate = type(self).gate
        if gate is not None:
            gate.wait(30)
        assert path.startswith(STORE + "://"), path
        return super().open(os.path.join(self.root, path[len(STORE) + 3:]), *args, **kwargs)


@pytest.fixture
def store(tmp_path, monkeypatch):
    """The store's local folder, with bucket/images/a.png and bucket/other/b.png."""
    root = tmp_path / "store"
    for rel in ("bucket/images/a.png", "bucket/other/b.png", "bucket/images-private/c.png"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(PNG)
    monkeypatch.setattr(_StoreFileSystem, "root", str(root))
    gate = threading.Event()
    yield root, gate
    gate.set()  # let any hanging read finish, so its thread ends
    _StoreFileSystem.gate = None
    wait_for_abandoned_reads(0)


def wait_for_abandoned_reads(count, limit=5.0):
    give_up = time.monotonic() + limit
    while images._abandoned_reads > count and time.monotonic() < give_up:
        time.sleep(0.02)
    assert images._abandoned_reads <= count


def test_object_store_read(store):
    assert fetch_image_bytes(f"{STORE}://bucket/images/a.png", timeout=2) == PNG
    with pytest.raises(ImageFetchError):
        fetch_image_bytes(f"{STORE}://bucket/images/missing.png", timeout=2)


def test_hanging_object_store_cannot_outlast_the_deadline(store, monkeypatch):
    _, gate = store
    monkeypatch.setattr(_StoreFileSystem, "gate", gate)
    started = time.monotonic()
    with within(2.0), pytest.raises(ImageFetchError) as info:
        fetch_image_bytes(f"{STORE}://bucket/images/a.png", timeout=1)
    assert time.monotonic() - started > 0.9
    assert "timed out after 1 s reading image" in refused(info)


def test_stuck_reads_are_capped(store, monkeypatch, tmp_path):
    _, gate = store
    wait_for_abandoned_reads(0)  # earlier tests' released reads may still be ending
    monkeypatch.setattr(images, "_MAX_ABANDONED_READS", 1)
    monkeypatch.setattr(_StoreFileSystem, "gate", gate)
    with within(1.5), pytest.raises(ImageFetchError):
        fetch_image_bytes(f"{STORE}://bucket/images/a.png", timeout=0.5)
    local = tmp_path / "local.png"
    local.write_bytes(PNG)
    # While that read is stuck, new reads fail at once instead of adding threads.
    with within(0.5), pytest.raises(ImageFetchError) as info:
        fetch_image_bytes(str(local), timeout=2)
    assert "still stuck past their deadline" in refused(info)
    gate.set()
    wait_for_abandoned_reads(0)
    assert fetch_image_bytes(str(local), timeout=2) == PNG


def _read_in_child(path, conn):
    try:
        conn.send(fetch_image_bytes(path, timeout=2) == PNG)
    except Exception as exc:  # pylint: disable=broad-except
        conn.send(f"{type(exc).__name__}: {exc}")


def test_forked_child_reads_with_its_own_workers(store, monkeypatch, tmp_path):
    """A child forked after reads (a process pool, Beam's multi-process runner) has none of the
    parent's worker threads and none of its stuck reads: its own reads must neither wait for
    workers that do not exist nor count the parent's abandoned reads."""
    import multiprocessing

    _, gate = store
    local = tmp_path / "local.png"
    local.write_bytes(PNG)
    assert fetch_image_bytes(str(local), timeout=2) == PNG  # leaves an idle worker in this process
    monkeypatch.setattr(images, "_MAX_ABANDONED_READS", 1)
    monkeypatch.setattr(_StoreFileSystem, "gate", gate)
    with pytest.raises(ImageFetchError):  # and one read stuck past its deadline
        fetch_image_bytes(f"{STORE}://bucket/images/a.png", timeout=0.3)
    ctx = multiprocessing.get_context("fork")
    parent_end, child_end = ctx.Pipe()
    child = ctx.Process(target=_read_in_child, args=(str(local), child_end))
    child.start()
    try:
        assert parent_end.poll(10), "the child's read hung"
        assert parent_end.recv() is True
    finally:
        child.join(10)
        if child.is_alive():
            child.kill()


@pytest.mark.parametrize("root_form", [f"{STORE}://bucket/images/", f"{STORE}://bucket/images"])
def test_object_store_root(store, root_form):
    assert fetch_image_bytes(f"{STORE}://bucket/images/a.png", timeout=2, image_root=root_form) == PNG
    for uri in (
        f"{STORE}://bucket/other/b.png",
        f"{STORE}://bucket/images/../other/b.png",  # outside once normalised
        f"{STORE}://bucket/other/../images/a.png",  # outside as written (GCS takes ".." literally)
        f"{STORE}://bucket/images-private/c.png",
        f"{STORE}://bucket/images",  # the root itself is no image
        f"{STORE}://other-bucket/images/a.png",
    ):
        with pytest.raises(ImageFetchError) as info:
            fetch_image_bytes(uri, timeout=2, image_root=root_form)
        assert f"outside the image root {root_form!r}" in refused(info), uri


def test_object_store_image_with_another_root_is_refused(store, tmp_path):
    for root in ("gs://bucket/images/", str(tmp_path), "file://" + str(tmp_path)):
        with pytest.raises(ImageFetchError) as info:
            fetch_image_bytes(f"{STORE}://bucket/images/a.png", timeout=2, image_root=root)
        assert "outside the image root" in refused(info)


def _fetch_threads():
    return [t for t in threading.enumerate() if t.name == "image-fetch"]


def test_reads_reuse_their_worker_threads_and_a_stuck_read_does_not_hold_up_the_next(store, monkeypatch, tmp_path):
    """Deadline reads run on kept daemon workers (a new thread per read cost ~5x the read itself): many
    reads in a row start no new thread, and a read stuck past its deadline keeps its worker while the
    next read gets another one."""
    _, gate = store
    wait_for_abandoned_reads(0)
    local = tmp_path / "local.png"
    local.write_bytes(PNG)
    assert fetch_image_bytes(str(local), timeout=2) == PNG
    before = set(_fetch_threads())  # at least the one that just read; earlier tests may have left more
    ran_on = [images._run_with_deadline(threading.current_thread, time.monotonic() + 2) for _ in range(50)]
    assert ran_on[0].name == "image-fetch" and set(ran_on) <= before  # no new thread for any of them
    for _ in range(50):
        assert fetch_image_bytes(str(local), timeout=2) == PNG
    assert all(t.daemon for t in _fetch_threads())  # a stuck one never blocks the interpreter's exit
    monkeypatch.setattr(_StoreFileSystem, "gate", gate)
    with within(1.5), pytest.raises(ImageFetchError):
        fetch_image_bytes(f"{STORE}://bucket/images/a.png", timeout=0.5)
    with within(0.5):
        assert fetch_image_bytes(str(local), timeout=2) == PNG
    gate.set()
    wait_for_abandoned_reads(0)
