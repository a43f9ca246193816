"""Publishing: upload a merged model directory to a Hub repo, creating the repo (and branch) when missing.

Every call to the Hub goes through the object `hub_api()` returns, one seam that tests replace."""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from merger import __version__
from merger.errors import MergerError, ModelError
from merger.files import Folder
from merger.recipe import HUB_REPO_ID
from merger.sources import INDEX_NAME, SINGLE_NAME

REPO_ID = re.compile(HUB_REPO_ID)


class PublishError(MergerError):
    """The result could not be published."""


@dataclass(frozen=True)
class Upload:
    directory: Path
    repo_id: str
    files: list[tuple[str, int]]  # path in the repo, bytes
    private: bool = False
    revision: str | None = None  # branch; None: the default branch
    commit_message: str = ""
    skipped: list[tuple[str, str]] = field(default_factory=list)  # what is not uploaded, and why

    @property
    def nbytes(self) -> int:
        return sum(size for _, size in self.files)


def _check(folder: Folder, name: str) -> None:
    """Refuse file `name` of the folder unless it is, or links to, something inside the folder that is
    not hidden: the Hub client reads through links, so one that leads elsewhere (to /etc/passwd, ~/.ssh)
    would publish what it leads to."""
    path = folder.path / name
    real = Path(os.path.realpath(path))
    if real == path and not path.is_symlink():  # neither a link nor under one
        return
    try:
        folder.locate(name)
    except ModelError:
        raise PublishError(
            f"{folder.label}: {name} leads outside the folder (to {real}); refusing to upload it"
        ) from None
    if not real.exists():
        raise PublishError(f"{folder.label}: {name} is a link to {real}, which does not exist; refusing to upload it")
    root = next(r for r in folder.roots if real == r or r in real.parents)
    if any(part.startswith(".") for part in real.relative_to(root).parts):
        raise PublishError(f"{folder.label}: {name} leads to a hidden file (to {real}); refusing to upload it")


def prepare(
    directory: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
) -> Upload:
    """Check that `directory` holds a model and `repo_id` is a repo id, and list what would be uploaded."""
    directory = Path(directory).expanduser()
    if not REPO_ID.fullmatch(repo_id):
        raise PublishError(f"'{repo_id}' is not a Hub repo id (org/name, of letters, digits, '-', '_' and '.')")
    if not directory.is_dir():
        raise PublishError(f"{directory}: no such directory")
    if not (directory / INDEX_NAME).is_file() and not (directory / SINGLE_NAME).is_file():
        raise PublishError(f"{directory} holds no {INDEX_NAME} or {SINGLE_NAME}: not a model to publish")
    folder = Folder.of(directory, str(directory))
    files, skipped = [], []
    for p in directory.rglob("*"):  # into no linked directory
        name = p.relative_to(directory).as_posix()
        if not any(part.startswith(".") for part in name.split("/")):
            _check(folder, name)
            if p.is_file():
                files.append((name, p.stat().st_size))
            elif p.is_symlink() and p.is_dir():
                skipped.append((name, "a link to a folder"))
            elif not p.is_dir():
                skipped.append((name, "not a regular file"))
    files.sort()
    message = commit_message or f"Upload merged model (merger {__version__})"
    return Upload(directory, repo_id, files, private, revision, message, sorted(skipped))


def hub_api():
    """The HfApi that publishes, for the endpoint in HF_ENDPOINT. Refuses early without a token, so a
    merge with a `hub:` section fails before merging rather than after."""
    from huggingface_hub import HfApi, get_token

    from merger.hub import LOGIN_HINT, Hub

    if get_token() is None:
        raise PublishError(f"publishing to the Hub needs a token with write access: {LOGIN_HINT}")
    return HfApi(endpoint=Hub().endpoint, library_name="merger", library_version=__version__)


def push(upload: Upload, api=None) -> str:
    """Create the repo (and branch) if missing, upload the files prepare() listed in one commit; return the
    commit URL."""
    api = api if api is not None else hub_api()
    folder = Folder.of(upload.directory, str(upload.directory))
    for name, _ in upload.files:  # still as prepare() found them (none swapped for a link since)
        _check(folder, name)
    try:
        api.create_repo(upload.repo_id, private=upload.private, exist_ok=True)
        if upload.revision:
            api.create_branch(upload.repo_id, branch=upload.revision, exist_ok=True)
        info = api.upload_folder(
            repo_id=upload.repo_id,
            folder_path=str(upload.directory),
            revision=upload.revision,
            commit_message=upload.commit_message,
            allow_patterns=[glob.escape(name) for name, _ in upload.files],  # exactly these (fnmatch patterns)
            ignore_patterns=[".*", "**/.*"],
        )
    except PublishError:
        raise
    except Exception as e:
        raise _explain(e, upload.repo_id) from None
    return str(getattr(info, "commit_url", info))


def _explain(e: Exception, repo_id: str) -> PublishError:
    """Like hub.Hub.explain: from the error's type and status only, never its text (it may quote the request)."""
    import httpx2

    status = getattr(getattr(e, "response", None), "status_code", None)
    if status in (401, 403):
        return PublishError(f"the Hub refused to let this token write to '{repo_id}' (HTTP {status})")
    if status is not None:
        return PublishError(f"publishing to '{repo_id}' failed: the Hub answered HTTP {status}")
    if isinstance(e, httpx2.TransportError):
        return PublishError(f"publishing to '{repo_id}' failed: cannot reach the Hub")
    return PublishError(f"publishing to '{repo_id}' failed: {type(e).__name__}")
