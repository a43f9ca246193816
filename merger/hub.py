"""Hub models: `org/name[@revision]` resolved to a commit, its safetensors headers read remotely (ranged
reads, nothing downloaded but the index), then only the files a merge uses fetched into the usual
Hugging Face cache, all at once or shard by shard (--low-disk). Offline, the cache alone is used.

The token is huggingface_hub's business (HF_TOKEN, or `hf auth login`): merger never reads it into a
message, a log line or a file.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from merger import __version__, hashes
from merger.errors import ModelError
from merger.files import Folder
from merger.sources import (
    INDEX_NAME,
    SINGLE_NAME,
    LocalModel,
    TensorInfo,
    collect,
    describe,
    header_length,
    no_weights,
    not_here,
    parse_header,
    read_index,
    scan_file,
)

COMMIT = re.compile(r"[0-9a-f]{40}")
HEADER_PROBE = 100_000  # bytes asked for first: most safetensors headers fit, so one request per shard
LOGIN_HINT = "set HF_TOKEN or run `hf auth login` (`huggingface-cli login` in older versions)"


@dataclass(frozen=True)
class RemoteFile:
    size: int
    etag: str  # sha256 for LFS files (weights), else the git blob id: what the cache names its blobs by

    def record(self) -> dict:
        """How the lock records it."""
        return {"sha256" if len(self.etag) == 64 else "git_sha1": self.etag, "size": self.size}


@dataclass
class Remote:
    """Where a Hub model's files come from: a repo at one commit."""

    hub: Hub
    ref: str
    repo_id: str
    commit: str
    files: dict[str, RemoteFile]  # the repo's files at `commit` (offline: those in the cache)
    snapshot: Path  # where hf_hub_download puts them

    @property
    def folder(self) -> Folder:
        """The snapshot as merger reads it: its files, and the blobs they link to beside it."""
        return Folder.of(self.snapshot, self.ref, storage=self.snapshot.parent.parent)

    def verify(self, name: str, stop: threading.Event | None = None) -> dict[str, str | int]:
        """Check that the fetched copy of `name` is the file the Hub lists (by its LFS sha256, or git blob
        id); returns how the lock records it. Its sha256 is read from the file unless an earlier run
        hashed it as it is now (merger.hashes)."""
        listed = self.files[name].record()
        folder = self.folder
        if "sha256" in listed:
            digest, st = hashes.hashed(folder, name, stop)
            now = {"sha256": digest, "size": st.st_size}
        else:
            data = folder.read_bytes(name)
            now = {"git_sha1": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest(), "size": len(data)}
        if now != listed:
            raise ModelError(
                f"'{self.ref}': the cached copy of {name} ({self.snapshot / name}) is not the file the Hub lists "
                f"at {self.commit[:12]} ({short_hash(now)}, expected {short_hash(listed)}): delete it from the Hugging "
                "Face cache and run again"
            )
        return listed

    def fetch(self, name: str) -> Path:
        """Download `name` into the cache (if it is not there yet) and return its path in the snapshot."""
        path = self.snapshot / name
        if path.exists():
            return path
        from huggingface_hub import hf_hub_download

        hub = self.hub
        try:
            got = hf_hub_download(
                self.repo_id,
                name,
                revision=self.commit,
                cache_dir=hub.cache_dir,
                endpoint=hub.endpoint,
                local_files_only=hub.offline,
                library_name="merger",
                library_version=__version__,
                tqdm_class=None if hub.progress else _Silent,
            )
        except Exception as e:
            raise hub.explain(e, self.ref, name=name, commit=self.commit) from None
        if Path(got) != path:
            raise ModelError(f"'{self.ref}': {name} was downloaded to {got}, not to {path} as expected")
        return path

    def drop(self, name: str) -> None:
        """Delete a fetched file from the cache: its snapshot link and the blob it points to."""
        path = self.snapshot / name
        blob = path.resolve()
        path.unlink(missing_ok=True)
        if blob != path and blob.parent.name == "blobs":
            blob.unlink(missing_ok=True)


class Hub:
    """merger's view of the Hugging Face Hub: its address and cache (HF_ENDPOINT, HF_HUB_CACHE or HF_HOME,
    read when this is made), offline or not, and commits pinned by a lock file (ref -> commit)."""

    def __init__(self, *, offline: bool = False, pins: dict[str, str] | None = None, progress: bool = False):
        from huggingface_hub import constants

        env = os.environ
        self.endpoint = env.get("HF_ENDPOINT", constants.ENDPOINT).rstrip("/")
        cache = env.get("HF_HUB_CACHE") or (os.path.join(env["HF_HOME"], "hub") if env.get("HF_HOME") else None)
        self.cache_dir = Path(cache or constants.HF_HUB_CACHE).expanduser().resolve()
        self.offline = offline or constants.is_offline_mode() or _true(env.get("HF_HUB_OFFLINE"))
        self.pins = pins or {}
        self.progress = progress

    def open(self, ref: str) -> LocalModel:
        """Resolve `ref` to a commit and describe its weights from their headers; fetch only the index."""
        repo_id, _, revision = ref.partition("@")
        revision = self.pins.get(ref) or revision or None
        try:
            remote = self._cached(ref, repo_id, revision) if self.offline else self._resolve(ref, repo_id, revision)
        except ModelError:
            raise
        except Exception as e:
            raise self.explain(e, ref, revision=revision) from None
        names = list(remote.files)
        weight_map = None
        folder = remote.folder
        if INDEX_NAME in remote.files:
            remote.fetch(INDEX_NAME)
            weight_map = read_index(folder.read_bytes(INDEX_NAME), ref)
            shards = sorted(set(weight_map.values()))
        elif SINGLE_NAME in remote.files:
            shards = [SINGLE_NAME]
        else:
            shards = sorted(n for n in names if n.endswith(".safetensors") and "/" not in n)
            if not shards and self.offline:
                raise ModelError(
                    f"'{ref}': none of its weights are in the Hugging Face cache ({remote.snapshot}) and merger "
                    "is offline; run once without --offline to download them"
                )
            if not shards:
                raise no_weights(ref, names)
        missing = [f for f in shards if f not in remote.files]
        if missing:
            raise self._missing(remote, missing, f"{INDEX_NAME} names")
        scanned, stamps = {}, {}
        for f in shards:
            scanned[remote.snapshot / f], stamp = self._header(remote, f)
            if stamp is not None:
                stamps[remote.snapshot / f] = stamp
        tensors = collect(ref, scanned, weight_map, remote.snapshot)
        return LocalModel(ref, remote.snapshot, sorted(scanned), tensors, folder, stamps, remote=remote)

    def _resolve(self, ref: str, repo_id: str, revision: str | None) -> Remote:
        """Ask the Hub which commit `revision` is and which files it holds (checks repo, revision and
        access; a gated repo's files answer only with a token, so its header reads check that)."""
        from huggingface_hub import HfApi

        info = HfApi(endpoint=self.endpoint, library_name="merger", library_version=__version__).model_info(
            repo_id, revision=revision, files_metadata=True
        )
        files = {
            s.rfilename: RemoteFile(s.lfs.size, s.lfs.sha256) if s.lfs else RemoteFile(s.size or 0, s.blob_id or "")
            for s in info.siblings or []
        }
        storage = self._storage(repo_id)
        if revision != info.sha:  # remember the branch or tag, as hf_hub_download would, for offline runs
            try:
                ref_file = storage / "refs" / (revision or "main")
                ref_file.parent.mkdir(parents=True, exist_ok=True)
                ref_file.write_text(info.sha)
            except OSError:
                pass  # a read-only cache still works online
        return Remote(self, ref, repo_id, info.sha, files, storage / "snapshots" / info.sha)

    def _cached(self, ref: str, repo_id: str, revision: str | None) -> Remote:
        """The same from the cache alone: the commit a branch or tag pointed at when last fetched."""
        storage = self._storage(repo_id)
        commit = revision if revision and COMMIT.fullmatch(revision) else None
        ref_file = storage / "refs" / (revision or "main")
        if commit is None and ref_file.is_file():
            commit = ref_file.read_text(errors="replace").strip()[:64]
            commit = commit if COMMIT.fullmatch(commit) else None  # a damaged refs file names no snapshot
        snapshot = storage / "snapshots" / (commit or "?")
        if commit is None or not snapshot.is_dir():
            raise ModelError(
                f"'{ref}': {not_here()}, and no model of that name is in the Hugging Face cache "
                f"({self.cache_dir}); merger is offline: run once without --offline (and HF_HUB_OFFLINE unset) "
                "to download it"
            )
        files = {}
        folder = Folder.of(snapshot, ref, storage=storage)
        for path in sorted(snapshot.rglob("*")):
            name = path.relative_to(snapshot).as_posix()
            st = folder.stat(name) if not path.is_dir() else None  # refused if it leads outside
            if st is not None:
                blob = path.resolve()
                etag = blob.name if blob != path else folder.sha256(name)  # links point at blobs named by etag
                files[name] = RemoteFile(st.st_size, etag)
        return Remote(self, ref, repo_id, commit, files, snapshot)

    def _storage(self, repo_id: str) -> Path:
        from huggingface_hub.file_download import repo_folder_name

        return self.cache_dir / repo_folder_name(repo_id=repo_id, repo_type="model")

    def _header(self, remote: Remote, name: str) -> tuple[dict[str, TensorInfo], tuple | None]:
        """The tensors of one shard, from the cache if it is there (with the file's stamp), else from
        ranged reads of the Hub (no stamp)."""
        path = remote.snapshot / name
        if path.exists():
            return scan_file(remote.folder, name)
        label = f"{remote.repo_id}@{remote.commit[:12]}/{name}"
        size = remote.files[name].size
        head = self._range(remote, name, 0, min(size, HEADER_PROBE))
        n = header_length(head, label, size)
        if 8 + n > len(head):
            head += self._range(remote, name, len(head), min(size, 8 + n))
        return describe(parse_header(head[8 : 8 + n], n, label), 8 + n, size, path, label), None

    def _range(self, remote: Remote, name: str, start: int, stop: int) -> bytes:
        """Bytes [start, stop) of a file on the Hub."""
        from huggingface_hub import hf_hub_url
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

        url = hf_hub_url(remote.repo_id, name, revision=remote.commit, endpoint=self.endpoint)
        headers = build_hf_headers(library_name="merger", library_version=__version__)
        headers["range"] = f"bytes={start}-{stop - 1}"
        try:
            r = get_session().get(url, headers=headers, timeout=60)
            hf_raise_for_status(r)
        except Exception as e:
            raise self.explain(e, remote.ref, name=name, commit=remote.commit) from None
        data = r.content if r.status_code == 206 else r.content[start:stop]
        if len(data) != stop - start:
            raise ModelError(f"'{remote.ref}': {name} is shorter on the Hub than its listed size")
        return data

    def _missing(self, remote: Remote, names: list[str], how: str) -> ModelError:
        where = f"the Hugging Face cache ({remote.snapshot})" if self.offline else f"the repo at {remote.commit[:12]}"
        fix = "; run once without --offline to download it" if self.offline else ""
        return ModelError(f"'{remote.ref}': {how} {', '.join(names)}, which {where} lacks{fix}")

    def explain(self, e: Exception, ref: str, *, name: str | None = None, revision=None, commit=None) -> ModelError:
        """A huggingface_hub or network error as one line that says what to do. Built from the error's
        type and status only: its text may quote the request, and no part of a request leaves here."""
        import httpx2
        from huggingface_hub import errors

        repo_id = ref.partition("@")[0]
        page = f"{self.endpoint}/{repo_id}"
        status = getattr(getattr(e, "response", None), "status_code", None)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return ModelError(
                f"'{ref}': no space left on the device for the Hugging Face cache ({self.cache_dir}) while "
                f"downloading {name or 'its files'}; free space, or point HF_HUB_CACHE elsewhere"
            )
        if isinstance(e, errors.HFValidationError):
            return ModelError(f"'{ref}' is not a valid Hub id (org/name, of letters, digits, '-', '_' and '.')")
        if isinstance(e, errors.GatedRepoError):
            if _has_token():
                return ModelError(
                    f"'{ref}' is gated and the token in use has no access to it; request access at {page}"
                )
            return ModelError(f"'{ref}' is gated: request access at {page}, then {LOGIN_HINT}")
        if isinstance(e, errors.RepositoryNotFoundError):
            return ModelError(
                f"'{ref}': {not_here()}, nor a model of that name on the Hub ({self.endpoint}); if it is a "
                f"private model, {LOGIN_HINT} with a token that can read it"
            )
        if isinstance(e, errors.RevisionNotFoundError):
            return ModelError(f"'{ref}': {repo_id} has no revision '{revision}' (a branch, tag or commit)")
        if isinstance(e, errors.RemoteEntryNotFoundError):
            return ModelError(f"'{ref}': {name} is missing from the repo at {str(commit)[:12]}")
        if self.offline and isinstance(e, errors.LocalEntryNotFoundError | errors.OfflineModeIsEnabled):
            return ModelError(
                f"'{ref}': {name} is not in the Hugging Face cache ({self.cache_dir}) and merger is offline; "
                "run once without --offline to download it"
            )
        if name is None and isinstance(e, httpx2.TransportError | errors.LocalEntryNotFoundError):
            return ModelError(
                f"'{ref}': {not_here()}, and the Hub at {self.endpoint} cannot be reached to look for a model "
                "of that name; check the path, or the network (--offline uses the Hugging Face cache alone)"
            )
        if isinstance(e, httpx2.TransportError | errors.LocalEntryNotFoundError | errors.OfflineModeIsEnabled):
            return ModelError(
                f"'{ref}': cannot reach the Hub at {self.endpoint}; check the network, or pass --offline "
                "to use the Hugging Face cache alone"
            )
        if status == 401:
            return ModelError(f"'{ref}': the Hub refused the token (HTTP 401); {LOGIN_HINT} with a valid one")
        if status is not None:
            return ModelError(f"'{ref}': the Hub answered HTTP {status}" + (f" for {name}" if name else ""))
        return ModelError(f"'{ref}': {type(e).__name__} while talking to the Hub at {self.endpoint}")


class _Silent(tqdm):
    """No download bars (huggingface_hub passes its own options to a plain tqdm subclass)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "disable": True})


def short_hash(entry: dict) -> str:
    """A lock entry for messages: 'sha256 0123456789ab, 1000 bytes'."""
    kind = "sha256" if "sha256" in entry else "git_sha1" if "git_sha1" in entry else None
    return f"{kind} {str(entry.get(kind))[:12]}, {entry.get('size')} bytes" if kind else f"{entry.get('size')} bytes"


def _true(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _has_token() -> bool:
    from huggingface_hub import get_token

    return get_token() is not None
