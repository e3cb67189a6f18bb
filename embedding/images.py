"""Fetch, decode and normalise product images for the image encoder.

Catalog rows point at images by URI (local path, ``file://``, ``gs://`` or any
other Beam filesystem, or ``http(s)://``). One bad image must never fail a
bundle: every fetch or decode failure becomes an :class:`ImageError`, a
:class:`DataError` whose stable ``reason`` code sends the item to
``degraded/``. Inputs are untrusted, so fetched bytes and decoded pixels are
both bounded (a small file can declare a huge canvas: a decompression bomb),
and the pixel check happens on the header, before any pixel is decoded.

Fetching is hardened the same way: one overall deadline per image whatever
the scheme, only regular local files (a FIFO or device would block or never
end), http(s) hosts on public addresses only unless explicitly allowed (no
requests into the worker's network or to cloud metadata: SSRF), and an
optional root that local and object-store images must stay under.
"""

from __future__ import annotations

import functools
import http.client
import io
import ipaddress
import logging
import math
import os
import posixpath
import queue
import re
import socket
import ssl
import stat
import struct
import threading
import time
import urllib.parse

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from schemas import layout
from schemas.errors import DataError
from schemas.rejected import IMAGE_DECODE_FAILED, IMAGE_FETCH_FAILED, IMAGE_TOO_LARGE

_log = logging.getLogger(__name__)

# 40 Mpx covers any real product photo (a 45 Mpx camera is the odd exception)
# while capping a decoded RGBA frame at ~160 MB per worker thread.
DEFAULT_MAX_PIXELS = 40_000_000
# Far above any sane product photo; stops a mislabelled video or a huge TIFF
# from being pulled into memory whole.
DEFAULT_MAX_BYTES = 50 * 1024 * 1024
# One overall deadline per fetch (DNS, connect, TLS, headers and body, or the
# whole filesystem read): a hostile or broken source costs a row at most this.
DEFAULT_TIMEOUT_S = 30.0

# Only formats that product feeds actually use. Restricting Image.open keeps
# Pillow's rarely exercised plugins (PSD, TGA, EPS via Ghostscript...) off
# untrusted input. "JPEG" also yields MPO files (multi-picture JPEGs written
# by phones), which Pillow opens through the JPEG plugin.
_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP")

_READ_CHUNK = 1024 * 1024
_USER_AGENT = "catalog-index-image-fetch/1.0"

# What Pillow raises on corrupt or truncated data. It is not only OSError:
# plugins parse headers with struct and plain indexing, so a hostile file can
# surface as nearly any of these.
_DECODE_ERRORS = (
    UnidentifiedImageError,
    OSError,
    SyntaxError,
    ValueError,
    TypeError,
    IndexError,
    KeyError,
    EOFError,
    ZeroDivisionError,
    struct.error,
)

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


class ImageError(DataError):
    """An item's image is unusable; ``reason`` is one of schemas.rejected.IMAGE_REASONS."""

    reason = IMAGE_FETCH_FAILED


class ImageFetchError(ImageError):
    """The image bytes could not be read (missing file, HTTP error, timeout, empty)."""

    reason = IMAGE_FETCH_FAILED


class ImageDecodeError(ImageError):
    """The bytes are not a supported image, or are corrupt or truncated."""

    reason = IMAGE_DECODE_FAILED


class ImageTooLargeError(ImageError):
    """The image exceeds the byte or decoded-pixel bound."""

    reason = IMAGE_TOO_LARGE


def _named(uri):
    return f" {uri!r}" if uri is not None else ""


def _describe(exc):
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _check_positive(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_size(size):
    """Validates a (height, width) pair; a bad size is a programming error, not data."""
    try:
        height, width = size
    except (TypeError, ValueError):
        raise ValueError(f"size must be a (height, width) pair, got {size!r}") from None
    _check_positive("size height", height)
    _check_positive("size width", width)
    return height, width


# --------------------------------------------------------------------------- fetch

# Where a catalog row may point the fetcher by default: never at the worker's
# own network. These addresses only make the refusal message more precise; all
# of them are non-public anyway.
_CLOUD_METADATA = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP (metadata.google.internal), Azure, OCI
        "169.254.170.2",  # AWS ECS task credentials
        "100.100.100.200",  # Alibaba Cloud
        "fd00:ec2::254",  # AWS instance metadata over IPv6
    )
)
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
# RFC 1918 and IPv6 unique-local; Python's is_private is much broader (it also
# covers documentation and benchmarking ranges), which the catch-all handles.
_PRIVATE_NETWORKS = tuple(
    ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")

_PRIVATE_HOSTS_HINT = "pass --allow-private-image-hosts for intranet catalogs"
_MAX_REDIRECTS = 5
_REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
_URI_SCHEME = re.compile(r"([a-zA-Z][-a-zA-Z0-9+.]*)://")  # FileSystems.get_scheme's pattern
# Bytes a request target may not carry raw (space, controls, non-ASCII).
_UNSAFE_IN_TARGET = re.compile(r"[^\x21-\x7e]")

# Reads that run past their deadline are abandoned on their thread (see
# _run_with_deadline). Past this many still-stuck threads (a hung NFS mount,
# a storage client retrying for minutes on every row) new reads fail at once
# instead of piling up threads without bound.
_MAX_ABANDONED_READS = 64
_abandoned_lock = threading.Lock()
_abandoned_reads = 0


def _forget_abandoned_reads():
    """In a forked child: the stuck reads were threads of the parent, which the child does not have."""
    global _abandoned_lock, _abandoned_reads  # pylint: disable=global-statement
    _abandoned_lock = threading.Lock()
    _abandoned_reads = 0


os.register_at_fork(after_in_child=_forget_abandoned_reads)


def _embedded_ipv4(addr):
    """The IPv4 address an IPv6 address carries traffic to, and how, or (None, None)."""
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped, "IPv4-mapped"
    if addr in _NAT64:
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF), "NAT64"
    if addr.sixtofour is not None:
        return addr.sixtofour, "6to4"
    if addr in _IPV4_COMPATIBLE and int(addr) > 1:  # not :: nor ::1
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF), "IPv4-compatible"
    return None, None


def refused_address_reason(ip) -> str | None:
    """Why an image must not be fetched from ``ip`` by default; None for a public address.

    ``ip`` is an IPv4 or IPv6 address, as a string (an IPv6 zone such as
    ``%eth0`` is ignored) or an ipaddress object. The answer is a phrase such
    as ``"a loopback address"``. IPv6 forms that embed an IPv4 address
    (IPv4-mapped, IPv4-compatible, NAT64, 6to4) are judged by that address,
    because that is where the packets go. Raises ValueError for a non-address.
    """
    addr = ipaddress.ip_address(ip.split("%", 1)[0] if isinstance(ip, str) else ip)
    if addr.version == 6:
        embedded, how = _embedded_ipv4(addr)
        if embedded is not None:
            inner = refused_address_reason(embedded)
            if inner is not None:
                return f"{inner} ({how} {embedded})"
            if how in ("IPv4-mapped", "NAT64"):
                # A public IPv4 host; on IPv6-only workers DNS64 hands out
                # NAT64 addresses for every IPv4-only image server.
                return None
            # 6to4 and IPv4-compatible fall through to the IPv6 checks
            # (the latter is deprecated and lands on "reserved").
    if addr.is_unspecified:
        return "an unspecified address"
    if addr.is_loopback:
        return "a loopback address"
    if addr in _CLOUD_METADATA:  # before link-local: 169.254.169.254 is both
        return "a cloud metadata address"
    if addr.is_link_local:
        return "a link-local address"
    if addr.is_multicast:  # Python counts most multicast as is_global
        return "a multicast address"
    if addr in _CGNAT:  # neither is_private nor is_global in Python
        return "a shared (CGNAT) address"
    if any(addr in network for network in _PRIVATE_NETWORKS):
        return "a private address"
    if addr.is_reserved:
        return "a reserved address"
    if not addr.is_global:  # documentation, benchmarking, 0.0.0.0/8, ...
        return "a non-public address"
    return None


def _read_bounded(read, max_bytes, uri, deadline=None):
    """Calls ``read(n)`` until EOF, but never takes more than max_bytes + 1 bytes.

    Reading one byte past the bound is how an over-large body is detected
    without trusting a Content-Length header or a file size.
    """
    chunks = []
    total = 0
    while True:
        chunk = read(min(_READ_CHUNK, max_bytes + 1 - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
        if total > max_bytes:
            raise ImageTooLargeError(
                f"image {uri!r} is larger than the {max_bytes}-byte limit"
            )
        # Also stops an abandoned background read (see _run_with_deadline)
        # from pulling the rest of a big file into memory for nothing.
        if deadline is not None and time.monotonic() > deadline:
            raise ImageFetchError(f"timed out reading image {uri!r}")
    return b"".join(chunks)


class _DaemonWorkers:
    """Daemon threads that run submitted calls, started only when none is idle, and kept.

    Starting a thread per read cost about as much as reading and hashing a small local image (an
    incremental run fetches every image to compare its bytes). concurrent.futures' pool is no
    substitute: its threads are joined at interpreter exit, so one read stuck on a hung mount would
    keep the process from ending. Workers busy with abandoned reads are not idle; new ones start.
    """

    def __init__(self):
        self._reset()
        # A forked child has none of the parent's threads: idle workers counted there would take
        # its tasks off a queue nobody reads, and every read would time out.
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self):
        self._tasks = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0

    def submit(self, fn) -> threading.Event:
        """Runs ``fn`` (which must not raise) on a worker; the event is set once it returned and its
        worker is idle again, so a caller that waits for it and submits again reuses that worker."""
        done = threading.Event()
        with self._lock:
            start = self._idle == 0
            if not start:
                self._idle -= 1
        if start:
            threading.Thread(target=self._work, name="image-fetch", daemon=True).start()
        self._tasks.put((fn, done))
        return done

    def _work(self):
        while True:
            fn, done = self._tasks.get()
            fn()
            with self._lock:
                self._idle += 1
            done.set()


_workers = _DaemonWorkers()


def _run_with_deadline(fn, deadline):
    """Returns ``fn()``, run on a daemon worker thread; raises TimeoutError at the deadline.

    For blocking calls that take no timeout and cannot be interrupted from
    Python: getaddrinfo, a stat on a hung network mount, a cloud storage
    client retrying for minutes. At the deadline the thread is abandoned; it
    ends whenever the call returns, and its result is dropped.
    """
    global _abandoned_reads  # pylint: disable=global-statement
    with _abandoned_lock:
        if _abandoned_reads >= _MAX_ABANDONED_READS:
            raise OSError(f"{_abandoned_reads} earlier image reads are still stuck past their deadline")
    box = {"finished": False, "abandoned": False}

    def target():
        global _abandoned_reads  # pylint: disable=global-statement
        try:
            box["result"] = fn()
        except BaseException as exc:  # pylint: disable=broad-except
            box["error"] = exc  # re-raised on the caller's thread
        finally:
            with _abandoned_lock:
                box["finished"] = True
                if box["abandoned"]:
                    _abandoned_reads -= 1

    done = _workers.submit(target)
    done.wait(max(0.0, deadline - time.monotonic()))
    with _abandoned_lock:
        # Decided under the lock, so a thread finishing right now is either
        # counted as abandoned and uncounted by itself, or not counted at all.
        if not box["finished"]:
            box["abandoned"] = True
            _abandoned_reads += 1
            raise TimeoutError("image fetch deadline reached")
    if "error" in box:
        raise box["error"]
    return box["result"]


# ---------------------------------------------------------------- fetch: http(s)


def _arm(sock, deadline):
    """Gives the next socket operation only the time left before the deadline."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError("image fetch deadline reached")
    sock.settimeout(remaining)


class _DeadlineReader(io.RawIOBase):
    """Raw reads from a socket, each limited to the time left before the deadline."""

    def __init__(self, sock, deadline):
        super().__init__()
        self._sock = sock
        self._deadline = deadline

    def readable(self):
        return True

    def readinto(self, buffer):
        _arm(self._sock, self._deadline)
        return self._sock.recv_into(buffer)


class _DeadlineSocket:
    """A connected (TLS) socket as http.client uses it, bounded by one overall deadline.

    A socket timeout applies to each operation afresh, so a server sending a
    header byte per second would keep a fetch alive for ever; re-arming it
    with the remaining time before every send and receive bounds the whole
    exchange, status line and headers included.
    """

    def __init__(self, sock, deadline):
        self._sock = sock
        self._deadline = deadline

    def sendall(self, data):
        _arm(self._sock, self._deadline)
        self._sock.sendall(data)  # the timeout bounds the whole sendall

    def makefile(self, mode="rb", *args, **kwargs):  # pylint: disable=unused-argument
        if mode != "rb":
            raise ValueError(f"unsupported mode {mode!r}")
        return io.BufferedReader(_DeadlineReader(self._sock, self._deadline))

    def close(self):
        pass  # the real socket belongs to _http_get, which closes it


@functools.lru_cache(maxsize=1)
def _ssl_context():
    # Loading the system CA store costs milliseconds: once per process. The
    # default context verifies the certificate and the hostname.
    return ssl.create_default_context()


def _resolve(host, port, deadline):
    """All (family, type, proto, canonname, sockaddr) of host, found before the deadline."""
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        # A name: getaddrinfo has no timeout, so it runs on a watched thread.
        infos = _run_with_deadline(
            lambda: socket.getaddrinfo(host, port, type=socket.SOCK_STREAM), deadline
        )
    else:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
    infos = [info for info in infos if info[0] in (socket.AF_INET, socket.AF_INET6)]
    if not infos:
        raise OSError(f"no IPv4 or IPv6 address for host {host!r}")
    return infos


def _connect(infos, deadline):
    """A socket connected to the first reachable address of ``infos``.

    The time left is shared among the addresses still to try, so one
    black-holed address cannot eat the whole deadline.
    """
    last_error = None
    for index, (family, type_, proto, _, sockaddr) in enumerate(infos):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        sock = socket.socket(family, type_, proto)
        try:
            sock.settimeout(remaining / (len(infos) - index))
            sock.connect(sockaddr)
            return sock
        except OSError as exc:
            sock.close()
            last_error = exc
    raise last_error or TimeoutError("image fetch deadline reached")


def _request_target(parts):
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    # Percent-encode what may not appear raw in a request line, as browsers
    # do; http.client would refuse a URL with a space or an accented letter.
    return _UNSAFE_IN_TARGET.sub(lambda m: urllib.parse.quote(m.group()), target)


def _http_get(url, where, max_bytes, deadline, allow_private_hosts):
    """One GET of ``url``: returns the body (bytes) or a redirect target (str).

    The host is resolved once, every address is checked, and the connection
    goes to a checked address: a second lookup could answer differently (DNS
    rebinding). Host header, SNI and certificate check still use the name.
    """
    parts = urllib.parse.urlsplit(url)
    https = parts.scheme.lower() == "https"
    host = parts.hostname
    if not host:
        raise ValueError("no host in URL")
    port = parts.port or (443 if https else 80)  # .port raises ValueError when malformed
    infos = _resolve(host, port, deadline)
    if not allow_private_hosts:
        for info in infos:
            ip = info[4][0]
            reason = refused_address_reason(ip)
            if reason is not None:
                shown = host if host == ip else f"{host} ({ip})"
                raise ImageFetchError(
                    f"cannot fetch image {where}: refused: image host {shown} is {reason} "
                    f"({_PRIVATE_HOSTS_HINT})"
                )
    raw = _connect(infos, deadline)
    sock = raw
    try:
        if https:
            sock = _ssl_context().wrap_socket(raw, server_hostname=host, do_handshake_on_connect=False)
            _arm(sock, deadline)
            sock.do_handshake()  # CPython bounds the whole handshake by the timeout
            conn = http.client.HTTPSConnection(host, port, context=_ssl_context())
        else:
            conn = http.client.HTTPConnection(host, port)
        # A socket already in place: http.client never connects (or resolves)
        # itself, and only formats the request and parses the response.
        conn.sock = _DeadlineSocket(sock, deadline)
        conn.request(
            "GET", _request_target(parts), headers={"User-Agent": _USER_AGENT, "Connection": "close"}
        )
        response = conn.getresponse()
        status = response.status
        if status in _REDIRECT_CODES:
            location = response.getheader("Location")
            if not location or not location.strip():
                raise ImageFetchError(f"HTTP {status} without a Location fetching image {where}")
            return urllib.parse.urldefrag(urllib.parse.urljoin(url, location.strip())).url
        if not 200 <= status < 300:
            raise ImageFetchError(f"HTTP {status} {response.reason} fetching image {where}")
        length = response.getheader("Content-Length")
        if length is not None and length.strip().isdigit() and int(length) > max_bytes:
            raise ImageTooLargeError(
                f"image {where} declares {int(length)} bytes, over the {max_bytes}-byte limit"
            )
        # read1 returns what has arrived instead of waiting for a full chunk.
        return _read_bounded(response.read1, max_bytes, url, deadline)
    finally:
        sock.close()
        if sock is not raw:
            raw.close()  # a no-op once wrap_socket has taken the descriptor


def _fetch_http(uri, max_bytes, timeout, deadline, allow_private_hosts):
    """GETs an http(s) image, following at most _MAX_REDIRECTS redirects, each hop checked.

    Environment proxies are deliberately not used: connecting through one
    would defeat the address check. Credentials in the URL are not sent.
    """
    url = uri
    redirects = 0
    while True:
        where = repr(uri) if url == uri else f"{uri!r} (redirected to {url!r})"
        try:
            outcome = _http_get(url, where, max_bytes, deadline, allow_private_hosts)
        except ImageError:
            raise
        except TimeoutError as exc:  # socket.timeout is TimeoutError
            raise ImageFetchError(f"timed out after {timeout:g} s fetching image {where}") from exc
        # OSError: DNS, connect, TLS (ssl.SSLError, certificate mismatch);
        # HTTPException: broken responses (BadStatusLine, IncompleteRead,
        # LineTooLong, too many headers); ValueError: a malformed URL or port.
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise ImageFetchError(f"cannot fetch image {where}: {_describe(exc)}") from exc
        if isinstance(outcome, bytes):
            return outcome
        redirects += 1
        if redirects > _MAX_REDIRECTS:
            raise ImageFetchError(f"cannot fetch image {uri!r}: more than {_MAX_REDIRECTS} redirects")
        if urllib.parse.urlsplit(outcome).scheme.lower() not in ("http", "https"):
            raise ImageFetchError(
                f"cannot fetch image {where}: refused redirect to {outcome!r} "
                "(only http and https are followed)"
            )
        url = outcome


# ------------------------------------------------------------ fetch: filesystems


def _file_kind(mode):
    for test, kind in (
        (stat.S_ISDIR, "directory"),
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISSOCK, "socket"),
    ):
        if test(mode):
            return kind
    return "special file"


def _is_under(path, root, sep):
    """Whether ``path`` lies strictly below directory ``root`` (both normalised)."""
    return path.startswith(root.rstrip(sep) + sep)


def _outside_root(uri, image_root):
    return ImageFetchError(f"refused: image {uri!r} is outside the image root {image_root!r}")


def _local_path(uri):
    return layout.local_path(uri)  # the one file:// rule


def _read_local(uri, max_bytes, deadline, image_root):
    """Reads a local regular file; anything else is refused without blocking on it."""
    path = _local_path(uri)
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    if image_root is not None:
        root_scheme = _URI_SCHEME.match(image_root)
        if root_scheme is not None and root_scheme.group(1).lower() != "file":
            raise _outside_root(uri, image_root)
        # realpath resolves ".." and every symlink, so a link inside the root
        # cannot lead out of it. Opening the resolved path with O_NOFOLLOW
        # means a symlink swapped in afterwards is not followed either.
        path = os.path.realpath(path)
        if not _is_under(path, os.path.realpath(_local_path(image_root)), os.sep):
            raise _outside_root(uri, image_root)
        flags |= os.O_NOFOLLOW
    # stat (following symlinks, which are legitimate) refuses a FIFO, device,
    # directory or socket before it is even opened: opening some devices has
    # side effects, and a FIFO would block until a writer appears.
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise ImageFetchError(f"cannot read image {uri!r}: not a regular file ({_file_kind(mode)})")
    # The file may have been replaced since: O_NONBLOCK makes opening a FIFO
    # return at once, and fstat judges what was actually opened. On a regular
    # file O_NONBLOCK changes nothing.
    fd = os.open(path, flags)
    with io.FileIO(fd, "rb", closefd=True) as stream:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ImageFetchError(f"cannot read image {uri!r}: not a regular file ({_file_kind(mode)})")
        return _read_bounded(stream.read, max_bytes, uri, deadline)


def _check_store_root(uri, scheme, image_root):
    """Refuses an object-store URI that is not below ``image_root`` (same scheme).

    Both the URI as written and its ``..``-normalised form must be below the
    root: object stores such as GCS take "a/../b" literally as a name, other
    filesystems resolve it, and either way the object read must be inside.
    """
    root_scheme = _URI_SCHEME.match(image_root)
    if root_scheme is None or root_scheme.group(1).lower() != scheme:
        raise _outside_root(uri, image_root)
    root = posixpath.normpath("/" + image_root[root_scheme.end():])
    written = "/" + uri[len(scheme) + 3:]
    if not (_is_under(written, root, "/") and _is_under(posixpath.normpath(written), root, "/")):
        raise _outside_root(uri, image_root)


def _read_store(uri, max_bytes, deadline):
    """Reads through Beam's FileSystems (gs:// or any other registered scheme)."""
    # Imported here: local files and http(s) need no Beam, so the search library can load images without it.
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems

    # UNCOMPRESSED: the default AUTO would gunzip a name ending in ".gz"
    # (or ".bz2", ...) behind our back; image bytes are what we want.
    stream = FileSystems.open(
        uri,
        mime_type="application/octet-stream",
        compression_type=CompressionTypes.UNCOMPRESSED,
    )
    try:
        return _read_bounded(stream.read, max_bytes, uri, deadline)
    finally:
        stream.close()


def _fetch_filesystem(uri, scheme, max_bytes, timeout, deadline, image_root):
    if scheme in (None, "file"):
        read = functools.partial(_read_local, uri, max_bytes, deadline, image_root)
    else:
        if image_root is not None:
            _check_store_root(uri, scheme, image_root)
        read = functools.partial(_read_store, uri, max_bytes, deadline)
    try:
        # Even local reads run on a watched thread: a path on a hung NFS or
        # FUSE (gcsfuse) mount blocks in the kernel with no timeout. For gs://,
        # Beam's gcsio retries with google-api-core's default 120 s deadline,
        # which FileSystems.open offers no way to shorten.
        return _run_with_deadline(read, deadline)
    except ImageError:
        raise
    except TimeoutError as exc:
        raise ImageFetchError(f"timed out after {timeout:g} s reading image {uri!r}") from exc
    except (OSError, ValueError) as exc:
        # OSError: missing file, permissions, BeamIOError.
        # ValueError: no filesystem for the scheme, or its extra not installed.
        raise ImageFetchError(f"cannot read image {uri!r}: {_describe(exc)}") from exc
    except Exception as exc:  # pylint: disable=broad-except
        # Remote filesystem clients raise their own types (for example
        # google.api_core.exceptions.NotFound / Forbidden for gs://), which are
        # not OSErrors. The read covers only library I/O, so anything here is
        # about this one URI and must not fail the bundle.
        raise ImageFetchError(f"cannot read image {uri!r}: {_describe(exc)}") from exc


def _check_timeout(timeout):
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, (int, float))
        or not math.isfinite(timeout)
        or timeout <= 0
    ):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")


def fetch_image_bytes(
    uri: str,
    max_bytes: int = DEFAULT_MAX_BYTES,
    timeout: float = DEFAULT_TIMEOUT_S,
    *,
    allow_private_hosts: bool = False,
    image_root: str | None = None,
) -> bytes:
    """Returns the raw bytes of the image at ``uri``, within ``timeout`` seconds overall.

    ``http://`` and ``https://`` are fetched directly (no proxy), refusing
    hosts that resolve to loopback, private, link-local, metadata or other
    non-public addresses unless ``allow_private_hosts``; up to 5 redirects
    are followed, each checked the same way. Anything else (a local path,
    ``file://``, ``gs://``, any scheme Beam knows) is read through Beam's
    FileSystems, or directly for local files, which must be regular files,
    with no automatic decompression. ``image_root`` (a directory path or an
    object-store prefix), when given, confines non-http images below it.

    The deadline covers everything: DNS, connect, TLS, headers, body, or the
    whole filesystem read. Raises ImageFetchError for unreadable, refused,
    timed-out or empty images (zero bytes means the upload or copy never
    happened: a fetch problem, not a bad encoding), and ImageTooLargeError
    over ``max_bytes``. Bad bounds raise ValueError.
    """
    _check_positive("max_bytes", max_bytes)
    _check_timeout(timeout)
    if image_root is not None and (not isinstance(image_root, str) or not image_root.strip()):
        raise ValueError(f"image_root must be a non-empty path or URI prefix, got {image_root!r}")
    if not isinstance(uri, str) or not uri.strip():
        raise ImageFetchError(f"empty image URI {uri!r}")
    deadline = time.monotonic() + timeout
    match = _URI_SCHEME.match(uri)
    scheme = match.group(1).lower() if match else None
    if scheme in ("http", "https"):
        data = _fetch_http(uri, max_bytes, timeout, deadline, allow_private_hosts)
    else:
        data = _fetch_filesystem(uri, scheme, max_bytes, timeout, deadline, image_root)
    if not data:
        raise ImageFetchError(f"image {uri!r} is empty (0 bytes)")
    return data


# -------------------------------------------------------------------------- decode


def _high_bit_depth_to_rgb(img):
    """Scales 16/32-bit grayscale to 8 bits; Pillow's convert() would clip at 255.

    Among the supported formats only 16-bit PNG yields these modes ("I;16",
    or "I" from older Pillow), so "I" is read as 16-bit too. "F" (float) is
    clipped to [0, 255], as Pillow itself does.
    """
    values = np.asarray(img, dtype=np.float64)
    if img.mode != "F":
        values = values / 257.0  # 65535 -> 255 exactly
    gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, mode="L").convert("RGB")


def _to_rgb(img):
    """Converts any Pillow mode to RGB, compositing alpha onto white.

    White, not black: a product cut out on a transparent background is meant
    to look like the catalogue shot on white it replaces, and that is what
    the encoder saw for every other product. Black would also turn the fully
    transparent RGB (0, 0, 0) pixels of many PNGs into a black frame.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    # Palette, L and RGB images may carry a transparent colour in "transparency"
    # (PNG tRNS, GIF); convert("RGBA") turns it into real alpha.
    if mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in ("I", "F") or mode.startswith("I;16"):
        return _high_bit_depth_to_rgb(img)
    # L, 1, P without transparency, CMYK, YCbCr: Pillow's conversions are right.
    # CMYK ignores any ICC profile (a plain naive conversion).
    return img.convert("RGB")


FORMAT_NAMES = ", ".join(_FORMATS)


def _open_checked(data: bytes, max_pixels: int, where: str) -> Image.Image:
    """Image.open (the header only) with the canvas checked against ``max_pixels``; nothing decoded yet."""
    if not data:
        raise ImageDecodeError(f"image{where} is empty (0 bytes)")

    try:
        # Opening only parses the header. Pillow's own bomb check may fire here
        # (over 2x its global MAX_IMAGE_PIXELS); our bound below is independent
        # of that global, which we neither rely on nor change.
        img = Image.open(io.BytesIO(data), formats=list(_FORMATS))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # The warning only arrives as an exception under "-W error"-style
        # filters; either way it means the canvas is huge.
        raise ImageTooLargeError(f"image{where} is too large to decode safely: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(
            f"image{where} is not a readable {', '.join(_FORMATS)} image"
        ) from exc
    except _DECODE_ERRORS as exc:
        raise ImageDecodeError(f"cannot decode image{where}: {_describe(exc)}") from exc

    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"image{where} declares an empty canvas {width}x{height}")
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"image{where} is {width}x{height} = {width * height} pixels, "
            f"over the {max_pixels}-pixel limit"
        )
    return img


def check_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, uri: str | None = None) -> tuple[int, int]:
    """(width, height) of JPEG, PNG, GIF, BMP or WebP bytes, from the header alone: what a service checks
    on an upload before any pixel is decoded. Raises ImageTooLargeError over ``max_pixels``,
    ImageDecodeError for anything that is not such an image, exactly as decode_image would."""
    _check_positive("max_pixels", max_pixels)
    with _open_checked(data, max_pixels, _named(uri)) as img:
        return img.size


def decode_image(
    data: bytes,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    uri: str | None = None,
    *,
    min_size: tuple[int, int] | None = None,
) -> Image.Image:
    """Decodes JPEG, PNG, GIF, BMP or WebP bytes into an upright RGB image.

    The canvas size declared in the header is checked against ``max_pixels``
    before any pixel is decoded. EXIF orientation is applied; animated GIF or
    WebP yield their first frame. ``uri`` only names the image in errors.

    ``min_size`` (height, width), when given, lets a JPEG be decoded at 1/2,
    1/4 or 1/8 scale (DCT scaling, much faster on big photos) as long as
    both sides stay at least max(min_size); load_image passes its target size.

    Raises ImageTooLargeError over ``max_pixels``, ImageDecodeError otherwise.
    """
    _check_positive("max_pixels", max_pixels)
    if min_size is not None:
        _check_size(min_size)
    where = _named(uri)
    img = _open_checked(data, max_pixels, where)

    try:
        if min_size is not None:
            # A no-op for everything but JPEG. max() on both sides keeps the
            # draft large enough whichever way EXIF later rotates it, and a
            # centre crop to the target aspect keeps one full side, so the
            # crop is still at least the target size.
            side = max(min_size)
            img.draft(None, (side, side))
        # Image.open leaves the first frame current and we never seek, so
        # animated GIF / WebP decode only their first frame.
        img.load()
        img = _apply_exif_orientation(img, uri)
        return _to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(f"image{where} is too large to decode safely: {exc}") from exc
    except _DECODE_ERRORS as exc:
        # Truncated files land here: Pillow raises OSError ("image file is
        # truncated") unless the global LOAD_TRUNCATED_IMAGES is set, which we
        # leave alone so a half-downloaded photo is rejected, not half grey.
        raise ImageDecodeError(f"cannot decode image{where}: {_describe(exc)}") from exc


def _apply_exif_orientation(img, uri):
    try:
        ImageOps.exif_transpose(img, in_place=True)
    except Exception as exc:  # pylint: disable=broad-except
        # A malformed EXIF block (common from cheap cameras and editors) can
        # raise nearly anything from the EXIF parser. The pixels are fine, so
        # keep the image unrotated rather than lose it.
        _log.debug("ignoring unreadable EXIF orientation of image%s: %s", _named(uri), exc)
    return img


# --------------------------------------------------------------------- model input


def _center_crop_box(src_width, src_height, width, height):
    """Largest centred integer box with the target aspect ratio (at least 1x1)."""
    if src_width * height > width * src_height:  # source wider than target
        crop_width = max(1, min(src_width, round(src_height * width / height)))
        left = (src_width - crop_width) // 2
        return (left, 0, left + crop_width, src_height)
    crop_height = max(1, min(src_height, round(src_width * height / width)))
    top = (src_height - crop_height) // 2
    return (0, top, src_width, top + crop_height)


def to_model_input(img: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """Centre-crops ``img`` to the aspect of ``size`` = (height, width) and resizes.

    Returns float32 [height, width, 3] in [0, 1]. Small images are upscaled.
    Non-RGB images are converted as decode_image does (alpha onto white).
    """
    height, width = _check_size(size)
    img = _to_rgb(img)
    box = _center_crop_box(img.width, img.height, width, height)
    # An explicit crop, not resize(box=...): Pillow's filters read pixels just
    # outside a resize box, so the cropped-away margins would bleed into the
    # edges. reducing_gap first shrinks big photos by an integer factor (cheap
    # box filter) and finishes with bilinear; with a gap of 3 the result is
    # indistinguishable from a full bilinear resize.
    if box != (0, 0, img.width, img.height):
        img = img.crop(box)
    resized = img.resize((width, height), Image.Resampling.BILINEAR, reducing_gap=3.0)
    pixels = np.asarray(resized, dtype=np.uint8)
    return pixels.astype(np.float32) / np.float32(255.0)


def load_image(
    uri: str,
    size: tuple[int, int],
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
    allow_private_hosts: bool = False,
    image_root: str | None = None,
) -> np.ndarray:
    """Fetches, decodes and prepares one image: float32 [height, width, 3] in [0, 1].

    Every data failure raises an ImageError subclass; a bad ``size`` or bound
    is a programming error and raises ValueError before anything is fetched.
    ``timeout``, ``allow_private_hosts`` and ``image_root`` are as for
    fetch_image_bytes.
    """
    _check_size(size)
    _check_positive("max_pixels", max_pixels)
    data = fetch_image_bytes(
        uri,
        max_bytes=max_bytes,
        timeout=timeout,
        allow_private_hosts=allow_private_hosts,
        image_root=image_root,
    )
    img = decode_image(data, max_pixels=max_pixels, uri=uri, min_size=size)
    return to_model_input(img, size)
