"""A recording, fault-injecting HTTP proxy in front of a real DICOMweb server, for tests.

Orthanc cannot be made to answer 429 with ``Retry-After``, 404 for an instance it listed, or 500
on demand, and it does not say which instances were downloaded. This small stdlib stand-in on
the loopback interface forwards every request to Orthanc unchanged, records what was asked
(method and path, the kind of DICOMweb request), and answers with an injected status instead
when a fault is queued for that kind of request.
"""

from __future__ import annotations

import http.client
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

__all__ = ["Fault", "Proxy", "kind_of", "proxy_to"]

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade"}


def kind_of(path: str) -> str:
    """``studies``, ``series``, ``metadata``, ``instance``, ``frames`` or ``other``."""
    parts = urlsplit(path).path.strip("/").split("/")
    if "dicom-web" in parts:
        parts = parts[parts.index("dicom-web") + 1 :]
    if parts[-1] == "metadata":
        return "metadata"
    if "frames" in parts:
        return "frames"
    if parts[-1] == "studies":
        return "studies"
    if parts[-1] == "series":
        return "series"
    if len(parts) == 6 and parts[4] == "instances":
        return "instance"
    return "other"


@dataclass(frozen=True, slots=True)
class Fault:
    """An answer to give instead of forwarding."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Proxy:
    """The proxy's URL, what it forwarded, and the faults still queued (by request kind)."""

    url: str
    requests: list[tuple[str, str]] = field(default_factory=list)
    faults: dict[str, list[Fault]] = field(default_factory=dict)

    def paths(self, kind: str) -> list[str]:
        """The paths of the requests of one kind, in order."""
        return [path for k, path in self.requests if k == kind]


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""

    def _relay(self) -> None:
        proxy = self.server.proxy
        kind = kind_of(self.path)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with self.server.lock:
            proxy.requests.append((kind, urlsplit(self.path).path))
            queued = proxy.faults.get(kind)
            fault = queued.pop(0) if queued else None
        if fault is not None:
            self.send_response(fault.status)
            for name, value in fault.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        upstream = http.client.HTTPConnection(self.server.target, timeout=30)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            upstream.request(self.command, self.path, body=body or None, headers=headers)
            answer = upstream.getresponse()
            data = answer.read()
        finally:
            upstream.close()
        self.send_response(answer.status)
        for name, value in answer.getheaders():
            if name.lower() not in _HOP_BY_HOP | {"content-length"}:
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = _relay
    do_POST = _relay


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, target: str, proxy: Proxy) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.target = target
        self.proxy = proxy
        self.lock = threading.Lock()


@contextmanager
def proxy_to(base_url: str) -> Iterator[Proxy]:
    """A proxy to ``base_url`` (``http://127.0.0.1:<port>``), its URL with the same path root.

    Examples:
        >>> # with proxy_to(orthanc.base_url) as proxy:
        >>> #     archive = open_dicomweb_archive(proxy.url + "/dicom-web", ...)
    """
    proxy = Proxy(url="")
    server = _Server(urlsplit(base_url).netloc, proxy)
    proxy.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        server.shutdown()
        server.server_close()
