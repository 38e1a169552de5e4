"""A local stand-in for the Hugging Face Hub's HTTP API, for `huggingface_hub` to talk to for real.

It serves one dataset repo the way the Hub does for the calls our download makes: the revision
endpoint (`/api/datasets/<repo>/revision/<rev>`: the commit), the tree listing
(`/api/datasets/<repo>/tree/<rev>/data`, LFS sha256 and size per file), paths-info, and
`/datasets/<repo>/resolve/<rev>/<path>` with the headers `hf_hub_download` reads (X-Repo-Commit,
X-Linked-Etag / ETag, X-Linked-Size, Content-Length), Range requests for resumed transfers, and
optional redirects. A `faults` table makes it misbehave per file, as a broken or hostile server
would. Every request is recorded.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Standin:
    repo_id: str = "someone/tiny-stories"
    commit: str = "0123456789abcdef0123456789abcdef01234567"
    files: dict[str, bytes] = field(default_factory=dict)
    # path -> what goes wrong: "redirect" (to another origin, like the Hub's CDN), "truncate_once"
    # (the connection drops halfway, once), "endless" (a body without end), "oversize" (more bytes
    # than declared), "slow", "etag:<value>", "commit:<value>", "missing" (listed, but 404),
    # "ignore_range" (a resumed request gets the whole file again); "+" combines the last two.
    faults: dict[str, str] = field(default_factory=dict)
    listed_sha256: dict[str, str | None] = field(default_factory=dict)  # listing overrides
    extra_entries: list[dict[str, Any]] = field(default_factory=list)
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    served_once: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def entry(self, path: str) -> dict[str, Any]:
        data = self.files[path]
        oid = self.listed_sha256.get(path, sha256(data))
        e: dict[str, Any] = {
            "type": "file",
            "path": path,
            "size": len(data),
            "oid": hashlib.sha1(data).hexdigest(),  # a git blob id, not the content hash
        }
        if oid is not None:
            e["lfs"] = {"oid": oid, "size": len(data), "pointerSize": 134}
        return e

    def listing(self) -> list[dict[str, Any]]:
        return [self.entry(p) for p in sorted(self.files)] + self.extra_entries

    def paths(self, method: str | None = None, part: str = "") -> list[str]:
        return [p for m, p, _ in self.requests if (method is None or m == method) and part in p]

    def downloads(self) -> list[str]:
        """Paths whose bytes were asked for (GET on resolve or on the CDN), in order."""
        out = []
        for p in self.paths("GET"):
            if "/resolve/" in p:
                out.append(unquote(p.split("/resolve/", 1)[1].split("/", 1)[1]))
            elif p.startswith("/cdn/"):
                out.append(unquote(p[len("/cdn/") :]))
        return out


class _Handler(BaseHTTPRequestHandler):
    hub: Standin
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:  # keep pytest output clean
        pass

    def _json(self, obj: Any, code: int = 200) -> None:
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _not_found(self, what: str) -> None:
        body = json.dumps({"error": f"{what} not found"}).encode()
        self.send_response(404)
        self.send_header("Content-Type", "application/json")
        self.send_header(
            "X-Error-Code", "EntryNotFound" if "/resolve/" in self.path else "RepoNotFound"
        )
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _record(self) -> None:
        with self.hub.lock:
            self.hub.requests.append(
                (self.command, self.path, {k.lower(): v for k, v in self.headers.items()})
            )

    def do_POST(self) -> None:  # paths-info
        self._record()
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode()
        hub = self.hub
        m = re.fullmatch(
            rf"/api/datasets/{re.escape(hub.repo_id)}/paths-info/([^/?]+)", urlsplit(self.path).path
        )
        if not m:
            return self._not_found("repo")
        wanted = re.findall(r"paths=([^&]+)", body) or json.loads(body or "{}").get("paths", [])
        wanted = [unquote(w) for w in wanted]
        self._json([hub.entry(p) for p in wanted if p in hub.files])

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        self._record()
        hub = self.hub
        url = urlsplit(self.path)
        path = url.path
        repo = re.escape(hub.repo_id)
        if m := re.fullmatch(rf"/api/datasets/{repo}/revision/([^/]+)", path):
            if unquote(m[1]) not in ("main", hub.commit):
                return self._not_found("revision")
            siblings = [{"rfilename": p} for p in sorted(hub.files)]
            return self._json({"id": hub.repo_id, "sha": hub.commit, "siblings": siblings})
        if m := re.fullmatch(rf"/api/datasets/{repo}/tree/([^/]+)/data", path):
            if unquote(m[1]) not in ("main", hub.commit):
                return self._not_found("revision")
            return self._json(hub.listing())
        if m := re.fullmatch(rf"/datasets/{repo}/resolve/([^/]+)/(.+)", path):
            return self._resolve(unquote(m[1]), unquote(m[2]))
        if m := re.fullmatch(r"/cdn/(.+)", path):
            return self._body(unquote(m[1]))
        self._not_found("repo")

    def _resolve(self, rev: str, file: str) -> None:
        hub = self.hub
        if rev not in ("main", hub.commit) or file not in hub.files:
            return self._not_found("entry")
        fault = hub.faults.get(file, "")
        if fault == "missing":
            return self._not_found("entry")
        data = hub.files[file]
        etag = f'"{sha256(data)}"'
        commit = hub.commit
        if fault.startswith("etag:"):
            etag = fault[5:]
        if fault.startswith("commit:"):
            commit = fault[7:]
        if fault == "redirect":
            # Like the Hub's LFS files: a redirect to the storage, the LFS headers on it.
            self.send_response(302)
            # Another origin (localhost, not 127.0.0.1), as the Hub's CDN is: the client takes the
            # file's metadata from this response and sends no token there.
            port = self.server.server_address[1]
            self.send_header("Location", f"http://localhost:{port}/cdn/{file}")
            self.send_header("X-Repo-Commit", commit)
            self.send_header("X-Linked-Etag", etag)
            self.send_header("X-Linked-Size", str(len(data)))
            self.send_header("ETag", '"0000000000000000000000000000000000000000"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        headers = {"X-Repo-Commit": commit, "ETag": etag}
        if self.command == "HEAD":
            self.send_response(200)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            return
        self._body(file, headers)

    def _body(self, file: str, headers: dict[str, str] | None = None) -> None:
        data = self.hub.files[file]
        fault = self.hub.faults.get(file, "")
        start = 0
        rng = self.headers.get("Range")
        if rng and "ignore_range" not in fault and (m := re.fullmatch(r"bytes=(\d+)-", rng)):
            start = int(m[1])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if fault == "endless":
            self.send_header("Transfer-Encoding", "chunked")
        elif fault == "oversize":  # more than the HEAD and the listing declared
            self.send_header("Content-Length", str(len(data) - start + 65536))
        else:
            self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        if self.command != "HEAD":
            self._write_body(file, data[start:], fault)

    def _write_body(self, file: str, data: bytes, fault: str) -> None:
        hub = self.hub
        if "truncate_once" in fault and file not in hub.served_once:
            with hub.lock:
                hub.served_once.add(file)
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        if fault == "oversize":
            self.wfile.write(data + b"y" * 65536)
            return
        if fault == "endless":
            chunk = b"x" * 65536
            deadline = time.time() + 60
            try:
                while time.time() < deadline:
                    self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            except OSError:
                pass
            self.close_connection = True
            return
        if fault == "slow":  # a dribble (~5 KB/s), so a test can interrupt the transfer midway
            try:
                for i in range(0, len(data), 1024):
                    self.wfile.write(data[i : i + 1024])
                    self.wfile.flush()
                    time.sleep(0.2)
            except OSError:  # the client went away
                self.close_connection = True
            return
        self.wfile.write(data)


def serve(hub: Standin) -> tuple[ThreadingHTTPServer, str]:
    handler = type("Handler", (_Handler,), {"hub": hub})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"
