"""A local HTTP server (127.0.0.1) serving shard files with Range requests, as object
storage serves them, that can be told to stop answering: the request is held until the
server stops, as a storage read that never returns."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Callable
from pathlib import Path


class ShardServer:
    def __init__(self, root: Path, hold: Callable[[str], bool] = lambda path: False) -> None:
        self.root, self.hold = root, hold
        self.held: list[str] = []  # paths of the requests held so far
        self._stop = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _body(self) -> bytes | None:
                if server.hold(self.path):
                    server.held.append(self.path)
                    server._stop.wait()
                    return None
                f = server.root / self.path.lstrip("/")
                return f.read_bytes() if f.is_file() else None

            def do_HEAD(self) -> None:
                data = self._body()
                if data is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()

            def do_GET(self) -> None:
                data = self._body()
                if data is None:
                    self.send_error(404)
                    return
                rng = self.headers.get("Range")
                if rng:
                    a, _, b = rng.removeprefix("bytes=").partition("-")
                    start, end = int(a), min(int(b) if b else len(data) - 1, len(data) - 1)
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                    data = data[start:end + 1]
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._httpd.shutdown()
        self._httpd.server_close()
