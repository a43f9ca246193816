"""Publishing through the one seam around HfApi (merger.publish.hub_api), replaced here by a recorder."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import write_checkpoint

import merger.publish
from merger.cli import cli


class FakeApi:
    """Records what HfApi would be asked; `fail_with` makes upload_folder answer that HTTP status."""

    def __init__(self, fail_with: int | None = None):
        self.calls: list[tuple] = []
        self.fail_with = fail_with

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        if self.fail_with:
            import httpx2
            from huggingface_hub.errors import HfHubHTTPError

            response = httpx2.Response(self.fail_with, request=httpx2.Request("POST", "http://127.0.0.1:9/api"))
            raise HfHubHTTPError("Forbidden (Authorization: Bearer hf_SECRET)", response=response)
        self.calls.append(("upload_folder", kwargs, uploaded(**kwargs)))
        return SimpleNamespace(commit_url=f"https://hub.example/{kwargs['repo_id']}/commit/0123abc")


def uploaded(folder_path, allow_patterns=None, ignore_patterns=None, **_) -> list[str]:
    """The files HfApi.upload_folder would upload (as huggingface_hub 2.4 picks them: every path under the
    folder that is_file(), through links, that the patterns let through)."""
    from huggingface_hub.utils import filter_repo_objects

    folder = Path(folder_path).resolve()
    found = [p.relative_to(folder).as_posix() for p in sorted(folder.glob("**/*")) if p.is_file()]
    return list(filter_repo_objects(found, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))


@pytest.fixture
def api(monkeypatch):
    fake = FakeApi()
    monkeypatch.setattr(merger.publish, "hub_api", lambda: fake)
    return fake


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    t = {"a.weight": torch.ones(4, 4), "b.bias": torch.zeros(4)}
    write_checkpoint(Path("ft1"), t)
    write_checkpoint(Path("ft2"), {k: v + 1 for k, v in t.items()}, n_shards=1)
    for name, license in (("ft1", "mit"), ("ft2", "mit")):
        Path(name, "README.md").write_text(f"---\nlicense: {license}\n---\n")
    return tmp_path


RECIPE = "merge_method: linear\nmodels:\n  - model: ft1\n  - model: ft2\noutput:\n  path: out\n"
HUB = "hub:\n  repo_id: me/merged\n  private: true\n  revision: dev\n  commit_message: first merge\n"


def run(*args: str, code: int = 0):
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    return result


def test_push_command(workdir, api):
    Path("recipe.yaml").write_text(RECIPE)
    run("apply", "recipe.yaml", "--quiet")
    out = run("push", "out", "me/merged", "--private", "--revision", "dev", "--commit-message", "m").stdout
    assert out == "published 5 files to https://hub.example/me/merged/commit/0123abc\n"
    assert api.calls == [
        ("create_repo", "me/merged", {"private": True, "exist_ok": True}),
        ("create_branch", "me/merged", {"branch": "dev", "exist_ok": True}),
        (
            "upload_folder",
            {
                "repo_id": "me/merged",
                "folder_path": "out",
                "revision": "dev",
                "commit_message": "m",
                "allow_patterns": ["README.md", "config.json", "merger.lock.json", "model-00001-of-00001.safetensors",
                                   "model.safetensors.index.json"],
                "ignore_patterns": [".*", "**/.*"],
            },
            ["README.md", "config.json", "merger.lock.json", "model-00001-of-00001.safetensors",
             "model.safetensors.index.json"],
        ),
    ]  # fmt: skip
    card = yaml.safe_load(Path("out/README.md").read_text().split("---")[1])
    # local inputs are no base_model: the Hub refuses a card naming a path (it takes model ids only)
    assert card["license"] == "mit" and "base_model" not in card and "base_model_relation" not in card
    assert "- `ft1`" in Path("out/README.md").read_text()


def test_push_dry_run_contacts_nothing(workdir, api):
    Path("recipe.yaml").write_text(RECIPE)
    run("apply", "recipe.yaml", "--quiet")
    out = run("push", "out", "me/merged", "--dry-run").stdout.splitlines()
    assert (
        out[0]
        == "would upload 5 files (2.31 KB) to me/merged (the default branch) with message 'Upload merged model (merger 0.1.0)':"
    )
    assert [line.split()[0] for line in out[1:]] == sorted(os.listdir("out"))
    assert api.calls == []


def test_what_push_leaves_out_is_listed(workdir, api):
    """A FIFO and a link to a folder are not uploaded (the Hub client takes files): the dry run and the push
    say so, rather than leaving them out without a word."""
    Path("recipe.yaml").write_text(RECIPE)
    run("apply", "recipe.yaml", "--quiet")
    os.mkfifo("out/pipe")
    Path("out/sub").mkdir()
    Path("out/sub/notes.txt").write_text("n")
    os.symlink("sub", "out/linked")
    out = run("push", "out", "me/merged", "--dry-run").stdout.splitlines()
    assert out[-2:] == ["  not uploaded: linked (a link to a folder)", "  not uploaded: pipe (not a regular file)"]
    assert "  sub/notes.txt  1 B" in out
    pushed = run("push", "out", "me/merged")
    assert pushed.stderr == (
        "note: not uploaded: linked (a link to a folder)\nnote: not uploaded: pipe (not a regular file)\n"
    )


def test_a_locked_rerun_does_not_publish_where_the_lock_says(workdir, api):
    """A lock comes with the merge it records, often a published one: re-running it reproduces the merge and
    says how to publish it, rather than pushing to the repo the lock names with this user's token."""
    Path("recipe.yaml").write_text(RECIPE + HUB)
    run("apply", "recipe.yaml", "--quiet")
    assert [c[0] for c in api.calls] == ["create_repo", "create_branch", "upload_folder"]
    result = run("apply", "--locked", "out/merger.lock.json", "-o", "again")
    assert result.stderr == (
        "note: --locked does not publish to me/merged, as the lock's recipe says; `merger push again me/merged` does\n"
    )
    assert "published" not in result.stdout and len(api.calls) == 3
    shard = "model-00001-of-00001.safetensors"
    assert Path("again", shard).read_bytes() == Path("out", shard).read_bytes()


def test_names_holding_control_characters_are_shown_escaped(workdir, api):
    """A file named with a newline cannot add a line of its own to the dry run's listing (one that names a
    file that is not the one uploaded), nor an output path to the merge's summary line."""
    Path("recipe.yaml").write_text(RECIPE)
    merged = run("apply", "recipe.yaml", "-o", "o\nx").stdout
    assert merged.startswith(f"merged 2 tensors with linear into {workdir}/o\\nx (") and merged.count("\n") == 1
    assert "\n# o\\nx\n" in Path("o\nx", "README.md").read_text()  # the card's title, one heading
    Path("o\nx", "a\n  merger.lock.json  3 KB").write_text("")
    out = run("push", "o\nx", "me/merged", "--dry-run").stdout.splitlines()
    assert "  a\\n  merger.lock.json  3 KB  0 B" in out and len(out) == 7


def test_recipe_hub_section_publishes_after_the_merge(workdir, api):
    Path("recipe.yaml").write_text(RECIPE + HUB)
    out = run("apply", "recipe.yaml").stdout
    assert out.splitlines()[1] == "published to https://hub.example/me/merged/commit/0123abc"
    assert [c[0] for c in api.calls] == ["create_repo", "create_branch", "upload_folder"]
    assert api.calls[2][1]["commit_message"] == "first merge" and api.calls[2][1]["revision"] == "dev"
    assert api.calls[0][2]["private"] is True
    plan = run("plan", "recipe.yaml").stdout
    assert "  publish:      me/merged (private), branch dev\n" in plan
    api.calls.clear()
    run("apply", "recipe.yaml", "--force", "--no-push", "--quiet")
    assert api.calls == []


def test_recipe_hub_section_is_validated_before_the_merge(workdir, api):
    Path("recipe.yaml").write_text(RECIPE + HUB.replace("private:", "privat:"))
    err = run("apply", "recipe.yaml", code=2).stderr
    assert err == "error: recipe.yaml:9: hub.privat: unknown key (did you mean 'private'?)\n"
    Path("recipe.yaml").write_text(RECIPE + HUB.replace("me/merged", "no-slash"))
    err = run("apply", "recipe.yaml", code=2).stderr
    assert (
        err == "error: recipe.yaml:8: hub.repo_id: String should match pattern '^[\\w.-]+/[\\w.-]+$', got 'no-slash'\n"
    )
    assert not Path("out").exists() and api.calls == []


def test_publishing_without_a_token_fails_before_merging(workdir):
    Path("recipe.yaml").write_text(RECIPE + HUB)
    err = run("apply", "recipe.yaml", code=2).stderr
    assert err == (
        "error: publishing to the Hub needs a token with write access: set HF_TOKEN or run `hf auth login` "
        "(`huggingface-cli login` in older versions)\n"
    )
    assert not Path("out").exists()


def test_failed_upload_keeps_the_merge_and_never_shows_the_token(workdir, monkeypatch):
    fake = FakeApi(fail_with=403)
    monkeypatch.setattr(merger.publish, "hub_api", lambda: fake)
    Path("recipe.yaml").write_text(RECIPE + HUB)
    err = run("apply", "recipe.yaml", "--quiet", code=2).stderr
    assert err == (
        "error: the Hub refused to let this token write to 'me/merged' (HTTP 403); the merged model is in "
        f"{workdir / 'out'}: publish it with `merger push {workdir / 'out'} me/merged`\n"
    )
    assert "SECRET" not in err and Path("out/model.safetensors.index.json").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["nowhere", "me/x"], "nowhere: no such directory"),
        (["ft1", "me/x"], "ft1 holds no model.safetensors.index.json or model.safetensors: not a model to publish"),
        (["ft1", "not a repo"], "'not a repo' is not a Hub repo id (org/name, of letters, digits, '-', '_' and '.')"),
    ],
)
def test_push_refuses_bad_arguments(workdir, api, args, message):
    Path("ft1/model.safetensors.index.json").unlink()
    assert run("push", *args, code=2).stderr == f"error: {message}\n"
    assert api.calls == []


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda secret: Path("out/passwd.txt").symlink_to(secret), "out: passwd.txt leads outside the folder (to {secret})"),
        (lambda secret: Path("out/notes").symlink_to(secret.parent), "out: notes leads outside the folder (to {secret.parent})"),
        (lambda secret: Path("out/gone.txt").symlink_to("nowhere"), "out: gone.txt is a link to {workdir}/out/nowhere, which does not exist"),
        (lambda secret: Path("out/env.txt").symlink_to(".env"), "out: env.txt leads to a hidden file (to {workdir}/out/.env)"),
    ],
    ids=["file", "directory", "dangling", "to a hidden file"],
)  # fmt: skip
def test_push_refuses_links_that_lead_outside_the_folder(workdir, api, tmp_path_factory, make, message):
    """The Hub client uploads what a link leads to: `ln -s /etc/passwd out/passwd.txt` would publish it."""
    secret = tmp_path_factory.mktemp("elsewhere") / "passwd"
    secret.write_text("root:x:0:0")
    Path("recipe.yaml").write_text(RECIPE)
    run("apply", "recipe.yaml", "--quiet")
    Path("out/.env").write_text("HF_TOKEN=hf_SECRET")
    make(secret)
    want = f"error: {message.format(secret=secret, workdir=workdir)}; refusing to upload it\n"
    for dry_run in (["--dry-run"], []):
        assert run("push", "out", "me/x", *dry_run, code=2).stderr == want
    assert api.calls == []


def test_push_uploads_exactly_the_files_it_checked(workdir, api):
    """Links that stay inside the folder are uploaded as the files they lead to; a linked directory is not
    entered, hidden files are left out, and a file that appears after the check is not uploaded."""
    Path("recipe.yaml").write_text(RECIPE)
    run("apply", "recipe.yaml", "--quiet")
    Path("out/alias.json").symlink_to("config.json")
    Path("out/notes").mkdir()
    Path("out/notes/run [1].txt").write_text("lr 1e-5")
    Path("out/notes/run 1.txt").write_text("not [1]")
    Path("out/notes/up").symlink_to("..")
    Path("out/linked").symlink_to("notes")
    Path("out/.cache").mkdir()
    Path("out/.cache/x").write_text("hidden")
    upload = merger.publish.prepare("out", "me/x")
    listed = [name for name, _ in upload.files]
    assert listed == [
        "README.md", "alias.json", "config.json", "merger.lock.json", "model-00001-of-00001.safetensors",
        "model.safetensors.index.json", "notes/run 1.txt", "notes/run [1].txt",
    ]  # fmt: skip
    Path("out/late.txt").write_text("written after the check")
    merger.publish.push(upload, api)
    assert api.calls[-1][2] == listed
    Path("out/notes/run 1.txt").unlink()
    Path("out/notes/run 1.txt").symlink_to("/etc/hostname")  # swapped for a link after the check
    calls = len(api.calls)
    with pytest.raises(merger.publish.PublishError, match="run 1.txt leads outside the folder"):
        merger.publish.push(upload, api)
    assert len(api.calls) == calls
