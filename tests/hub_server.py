"""A Hugging Face Hub stand-in on 127.0.0.1 for tests: it serves the paths huggingface_hub
reads (``/{org}/{name}/resolve/{revision}/{file}``, HEAD and GET with ``Range``) from a folder
``root/{org}/{name}/{revision}/``, with the Hub's headers and error codes. Nothing leaves the
machine."""

from __future__ import annotations

import hashlib
import http.server
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class Hub:
    """What the server knows: the folder of repos, the gated ones, the slow files."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.gated: set[str] = set()
        self.slow: dict[str, float] = {}  # file name -> seconds to wait before answering a GET
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)


def _handler(hub: Hub) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # keep the test output clean
            return

        def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
            self._serve(body=False)

        def do_GET(self) -> None:  # noqa: N802
            self._serve(body=True)

        def _error(self, status: int, code: str, message: str) -> None:
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _serve(self, body: bool) -> None:
            path = urllib.parse.unquote(urllib.parse.urlparse(self.path).path)
            hub.requests.append((self.command, path, self.headers.get("Range")))
            parts = path.strip("/").split("/")
            if len(parts) < 5 or parts[2] != "resolve":
                return self._error(404, "EntryNotFound", "not a resolve path")
            repo, revision, name = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
            if repo in hub.gated:
                return self._error(401, "GatedRepo", "Access to this repo is restricted")
            if not (hub.root / repo).is_dir():
                return self._error(404, "RepoNotFound", "Repository not found")
            if not (hub.root / repo / revision).is_dir():
                return self._error(404, "RevisionNotFound", "Invalid rev id")
            file = hub.root / repo / revision / name
            if not file.is_file():
                return self._error(404, "EntryNotFound", "Entry not found")
            data = file.read_bytes()
            if body and name in hub.slow:
                time.sleep(hub.slow[name])
            status, chunk = 200, data
            wanted = self.headers.get("Range")
            if body and wanted and wanted.startswith("bytes="):
                start, _, end = wanted[6:].partition("-")
                first, last = int(start), min(int(end) if end else len(data) - 1, len(data) - 1)
                status, chunk = 206, data[first : last + 1]
            self.send_response(status)
            self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("Content-Length", str(len(chunk) if body else len(data)))
            self.end_headers()
            if body:
                self.wfile.write(chunk)

    return Handler


@contextmanager
def serve(root: Path) -> Iterator[tuple[str, Hub]]:
    """Serve ``root`` on a free port of 127.0.0.1; yields (endpoint URL, :class:`Hub`)."""
    hub = Hub(root)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", hub
    finally:
        server.shutdown()
        server.server_close()
