"""A fake Hugging Face Hub on 127.0.0.1: the few HTTP endpoints huggingface_hub calls for merger, answered
the way the Hub answers them (model info at a revision; files by revision, with HEAD, ranges, ETags and the
Hub's X-Error-Code headers), so huggingface_hub itself is what the tests drive."""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin")


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit -> path -> bytes
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag -> commit
    gated: bool = False
    private: bool = False
    lost: set[str] = field(default_factory=set)  # listed by the API, but 404 when fetched


class FakeHub:
    def __init__(self, token: str = "hf_FAKEtokenFORtests0123456789abcdef"):
        self.repos: dict[str, Repo] = {}
        self.token = token
        self.log: list[tuple[str, str, str | None]] = []  # (method, path, range header)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def publish(
        self,
        repo_id: str,
        source: Path | dict[str, bytes],
        *,
        branch: str = "main",
        tags: tuple[str, ...] = (),
        **flags,
    ) -> str:
        """Commit `source` (a directory, or path -> bytes) to `branch`; return the commit id."""
        if isinstance(source, Path):
            source = {
                p.relative_to(source).as_posix(): p.read_bytes() for p in sorted(source.rglob("*")) if p.is_file()
            }
        repo = self.repos.setdefault(repo_id, Repo())
        for k, v in flags.items():
            setattr(repo, k, v)
        digest = hashlib.sha1(repo_id.encode() + str(len(repo.commits)).encode())
        for name, data in sorted(source.items()):
            digest.update(name.encode() + hashlib.sha256(data).digest())
        commit = digest.hexdigest()
        repo.commits[commit] = dict(source)
        for ref in (branch, *tags):
            repo.refs[ref] = commit
        return commit

    def downloads(self) -> list[str]:
        """Paths of the whole-file GETs (downloads, as opposed to ranged header reads)."""
        return [path for method, path, rng in self.log if method == "GET" and "/resolve/" in path and rng is None]


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            self._serve(body=True)

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def _serve(self, body: bool) -> None:
            raw = urlsplit(self.path).path
            hub.log.append((self.command, unquote(raw), self.headers.get("range")))
            parts = [unquote(p) for p in raw.strip("/").split("/")]
            authorized = self.headers.get("authorization") == f"Bearer {hub.token}"
            if parts[:2] == ["api", "models"]:
                repo_id, rest = "/".join(parts[2:4]), parts[4:]
                revision = rest[1] if rest[:1] == ["revision"] else "main"
            elif len(parts) > 4 and parts[2] == "resolve":
                repo_id, revision, rest = "/".join(parts[:2]), parts[3], parts[4:]
            else:
                return self._reply(404, b"not found")
            repo = hub.repos.get(repo_id)
            if repo is None or (repo.private and not authorized):
                return self._error(401 if not authorized else 404, "RepoNotFound", "Repository not found")
            commit = repo.refs.get(revision) or (revision if revision in repo.commits else None)
            if commit is None:
                return self._error(404, "RevisionNotFound", "Invalid rev id")
            files = repo.commits[commit]
            if parts[0] == "api":
                return self._reply(200, json.dumps(_model_info(repo_id, repo, commit)).encode(), "application/json")
            if repo.gated and not authorized:
                return self._error(401, "GatedRepo", f"Access to model {repo_id} is restricted.", commit)
            name = "/".join(rest)
            if name not in files or name in repo.lost:
                return self._error(404, "EntryNotFound", "Entry not found", commit)
            data = files[name]
            headers = {"X-Repo-Commit": commit, "ETag": f'"{git_blob_id(data)}"', "Accept-Ranges": "bytes"}
            if name.endswith(LFS_SUFFIXES):
                headers |= {"X-Linked-Etag": f'"{hashlib.sha256(data).hexdigest()}"', "X-Linked-Size": str(len(data))}
            rng = self.headers.get("range")
            if rng and body:
                start, _, stop = rng.removeprefix("bytes=").partition("-")
                start, stop = int(start), min(int(stop or len(data) - 1), len(data) - 1)
                headers["Content-Range"] = f"bytes {start}-{stop}/{len(data)}"
                return self._reply(206, data[start : stop + 1], headers=headers)
            self._reply(200, data if body else b"", headers=headers, length=len(data))

        def _error(self, status: int, code: str, message: str, commit: str | None = None) -> None:
            headers = {"X-Error-Code": code, "X-Error-Message": message}
            if commit:
                headers["X-Repo-Commit"] = commit
            self._reply(status, json.dumps({"error": message}).encode(), "application/json", headers)

        def _reply(self, status, data: bytes, ctype="application/octet-stream", headers=None, length=None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data) if length is None else length))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

    return Handler


def _model_info(repo_id: str, repo: Repo, commit: str) -> dict:
    siblings = []
    for name, data in sorted(repo.commits[commit].items()):
        entry = {"rfilename": name, "size": len(data), "blobId": git_blob_id(data)}
        if name.endswith(LFS_SUFFIXES):
            entry["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        siblings.append(entry)
    gated = "manual" if repo.gated else False
    return {
        "id": repo_id,
        "modelId": repo_id,
        "sha": commit,
        "private": repo.private,
        "gated": gated,
        "siblings": siblings,
    }
