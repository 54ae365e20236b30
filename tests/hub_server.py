"""A loopback stand-in for the Hugging Face Hub: the endpoints ``huggingface_hub`` uses to create
a repo, commit files (regular uploads) and download them. In memory, 127.0.0.1 only.

Example:
    >>> with LoopbackHub() as hub:                         # doctest: +SKIP
    ...     os.environ["HF_ENDPOINT"] = hub.endpoint
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


@dataclass
class Repo:
    commits: list[tuple[str, dict[str, bytes]]] = field(default_factory=list)   # (oid, files)
    branches: dict[str, str] = field(default_factory=dict)

    def files_at(self, revision: str) -> tuple[str, dict[str, bytes]] | None:
        oid = self.branches.get(revision, revision)
        for c_oid, files in self.commits:
            if c_oid == oid:
                return c_oid, files
        return None


class LoopbackHub:
    """Start with ``with LoopbackHub() as hub``; ``hub.bytes_in`` / ``bytes_out`` count payload bytes,
    ``hub.fail_downloads`` cuts file downloads off half-way (a network error mid-download)."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.bytes_in = 0
        self.bytes_out = 0
        self.fail_downloads = False
        self.log: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:   # quiet
                pass

            def _body(self) -> bytes:
                n = int(self.headers.get("Content-Length") or 0)
                data = self.rfile.read(n) if n else b""
                hub.bytes_in += len(data)
                return data

            def _send(self, status: int, payload: bytes = b"", headers: dict | None = None,
                      content_type: str = "application/json", head: bool = False, cut: bool = False) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                if head:
                    return
                if cut:
                    self.wfile.write(payload[: len(payload) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.wfile.write(payload)
                hub.bytes_out += len(payload)

            def _json(self, status: int, obj, headers: dict | None = None) -> None:
                self._send(status, json.dumps(obj).encode(), headers)

            def _error(self, status: int, code: str, message: str) -> None:
                self._json(status, {"error": message}, {"X-Error-Code": code,
                                                        "X-Error-Message": " ".join(message.split())})

            def do_POST(self) -> None:
                path = unquote(urlparse(self.path).path)
                hub.log.append(f"POST {path}")
                body = self._body()
                if path == "/api/repos/create":
                    req = json.loads(body)
                    repo_id = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
                    if repo_id in hub.repos:
                        return self._json(409, {"error": "You already created this model repo",
                                                "url": f"{hub.endpoint}/{repo_id}"}, {"X-Error-Code": "RepoExists"})
                    hub.repos[repo_id] = Repo()
                    return self._json(200, {"url": f"{hub.endpoint}/{repo_id}", "name": repo_id})
                if path == "/api/validate-yaml":     # the client checks README front matter before a commit
                    import yaml
                    content = json.loads(body).get("content", "")
                    front = content.split("---")[1] if content.startswith("---") else ""
                    try:
                        yaml.safe_load(front)
                    except yaml.YAMLError as e:
                        return self._error(400, "InvalidYaml", str(e))
                    return self._json(200, {"errors": [], "warnings": []})
                if path.startswith("/api/models/") and "/preupload/" in path:
                    repo_id = path[len("/api/models/"):].split("/preupload/")[0]
                    if repo_id not in hub.repos:
                        return self._error(404, "RepoNotFound", "Repository not found")
                    files = json.loads(body)["files"]
                    return self._json(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                       "shouldIgnore": False} for f in files]})
                if path.startswith("/api/models/") and "/commit/" in path:
                    repo_id, revision = path[len("/api/models/"):].split("/commit/")
                    repo = hub.repos.get(repo_id)
                    if repo is None:
                        return self._error(404, "RepoNotFound", "Repository not found")
                    current = repo.files_at(revision)
                    files = dict(current[1]) if current else {}
                    for line in body.decode().splitlines():
                        if not line.strip():
                            continue
                        item = json.loads(line)
                        if item["key"] == "file":
                            v = item["value"]
                            files[v["path"]] = base64.b64decode(v["content"])
                        elif item["key"] == "deletedFile":
                            files.pop(item["value"]["path"], None)
                    oid = hashlib.sha1(repr((len(repo.commits), sorted(files.items()))).encode()).hexdigest()
                    repo.commits.append((oid, files))
                    repo.branches[revision] = oid
                    return self._json(200, {"commitUrl": f"{hub.endpoint}/{repo_id}/commit/{oid}",
                                            "commitOid": oid, "pullRequestUrl": None})
                return self._error(404, "NotFound", f"no route for POST {path}")

            def _resolve(self, head: bool) -> None:
                path = unquote(urlparse(self.path).path)
                hub.log.append(f"{'HEAD' if head else 'GET'} {path}")
                if path.startswith("/api/models/"):
                    rest = path[len("/api/models/"):]
                    tree = "/tree/" in rest
                    repo_id, _, revision = rest.partition("/tree/" if tree else "/revision/")
                    repo = hub.repos.get(repo_id)
                    if repo is None:
                        return self._error(404, "RepoNotFound", "Repository not found")
                    found = repo.files_at(revision or "main")
                    if found is None:
                        return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
                    oid, files = found
                    if tree:
                        return self._json(200, [{"type": "file", "path": p, "size": len(b),
                                                 "oid": hashlib.sha1(b).hexdigest()} for p, b in sorted(files.items())])
                    return self._json(200, {"id": repo_id, "modelId": repo_id, "sha": oid, "private": False,
                                            "siblings": [{"rfilename": p} for p in sorted(files)]})
                parts = path.lstrip("/").split("/")
                if "resolve" not in parts:
                    return self._error(404, "NotFound", f"no route for {path}")
                i = parts.index("resolve")
                repo_id, revision, filename = "/".join(parts[:i]), parts[i + 1], "/".join(parts[i + 2:])
                repo = hub.repos.get(repo_id)
                if repo is None:
                    return self._error(404, "RepoNotFound", "Repository not found")
                found = repo.files_at(revision)
                if found is None:
                    return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
                oid, files = found
                if filename not in files:
                    return self._error(404, "EntryNotFound", f"{filename} does not exist")
                data = files[filename]
                etag = hashlib.sha1(data).hexdigest()
                self._send(200, data, {"X-Repo-Commit": oid, "ETag": f'"{etag}"'},
                           content_type="application/octet-stream", head=head,
                           cut=hub.fail_downloads and not head)

            def do_GET(self) -> None:
                self._resolve(head=False)

            def do_HEAD(self) -> None:
                self._resolve(head=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "LoopbackHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextmanager
def pointed_at_loopback(monkeypatch, cache_dir) -> Iterator["LoopbackHub"]:
    """A running LoopbackHub with huggingface_hub pointed at it (endpoint, URL template, a private
    cache in ``cache_dir``, online, a token, short timeouts) for the duration of the block."""
    from huggingface_hub import constants
    with LoopbackHub() as server:
        monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            server.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache_dir))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_TOKEN", "hf_loopback")
        monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "2")
        yield server
