"""Hub models through huggingface_hub against a fake Hub on 127.0.0.1: resolve, validate from remote
headers, download only what the merge uses, offline, --low-disk, lock files and their re-runs."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import load_output, write_checkpoint
from fakehub import FakeHub

from merger.cli import cli

SHAPES = {"embed.weight": (12, 8), "layers.0.w": (8, 8), "layers.1.w": (8, 8), "layers.2.w": (8, 8), "norm": (8,)}
CARD = "---\nlicense: apache-2.0\nlanguage: en\n---\n# A model\n"


@pytest.fixture
def hub(monkeypatch):
    fake = FakeHub()
    monkeypatch.setenv("HF_ENDPOINT", fake.url)
    yield fake
    fake.close()


@pytest.fixture
def models(tmp_path, hub):
    """A base and two fine-tunes as local directories, and the same published on the fake Hub as org/base,
    org/ft1 (tag v1) and org/ft2 (named by commit), each with files a merge has no use for."""
    g = torch.Generator().manual_seed(0)
    base = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()} | {"position_ids": torch.arange(6)}
    local = {}
    for i, name in enumerate(("base", "ft1", "ft2")):
        tensors = {
            k: v + 0.3 * i * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in base.items()
        }
        d = write_checkpoint(tmp_path / "local" / name, tensors, n_shards=3 if i < 2 else 1, interleave=False)
        (d / "README.md").write_text(CARD)
        (d / "tokenizer.json").write_text(f'{{"model": "{name}"}}')
        local[name] = d
    (local["base"] / "generation_config.json").write_text("{}")
    extras = {"pytorch_model.bin": b"\x80\x04pickle", "notes/training.txt": b"not needed"}
    commits = {name: hub.publish(f"org/{name}", _files(d) | extras, tags=("v1",)) for name, d in local.items()}
    return local, commits


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in d.iterdir()}


def recipe(refs: dict[str, str], extra: str = "") -> str:
    return f"""merge_method: ties
base_model: {refs["base"]}
models:
  - model: {refs["ft1"]}
    parameters: {{weight: 1.0, density: 0.5}}
  - model: {refs["ft2"]}
    parameters: {{weight: 0.5}}
output: {{shard_size: 600B}}
{extra}"""


def hub_refs(commits: dict[str, str]) -> dict[str, str]:
    return {"base": "org/base", "ft1": "org/ft1@v1", "ft2": f"org/ft2@{commits['ft2']}"}


def run(*args: str, code: int = 0):
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    return result


def apply(tmp_path: Path, text: str, out: Path, *args: str, code: int = 0):
    (tmp_path / "recipe.yaml").write_text(text)
    return run("apply", str(tmp_path / "recipe.yaml"), "-o", str(out), "--quiet", *args, code=code)


def tree(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def cached_weights(home: Path) -> list[Path]:
    """Weight blobs in the Hugging Face cache (LFS blobs are named by their sha256)."""
    return [p for p in (home / "hub").glob("models--*/blobs/*") if len(p.name) == 64]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_hub_merge_equals_local_merge(tmp_path, hub, models, hf_home):
    local, commits = models
    apply(tmp_path, recipe({k: str(v) for k, v in local.items()}), tmp_path / "local-out")
    apply(tmp_path, recipe(hub_refs(commits)), tmp_path / "hub-out")
    a, b = tree(tmp_path / "local-out"), tree(tmp_path / "hub-out")
    assert sorted(a) == sorted(b)
    for name in a:
        if name not in ("README.md", "merger.lock.json"):
            assert a[name] == b[name], name
    assert len([n for n in b if n.startswith("model-")]) > 2

    # Only what the merge uses was downloaded, each file once: weights, index and card of every model, and
    # config, generation and tokenizer files of the base only; no pickle, no notes.
    got = sorted(hub.downloads())
    want = {"base": ["config.json", "generation_config.json", "tokenizer.json"], "ft1": [], "ft2": []}
    for name, d in local.items():
        want[name] += [f.name for f in d.iterdir() if f.name.startswith("model") or f.name == "README.md"]
    assert got == sorted(f"/org/{n}/resolve/{commits[n]}/{f}" for n, files in want.items() for f in files)

    card = b["README.md"].decode()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == ["org/base", "org/ft1", "org/ft2"]
    assert front["base_model_relation"] == "merge" and front["license"] == "apache-2.0"
    assert f"`org/ft1@v1` at commit `{commits['ft1'][:12]}`" in card

    lock = json.loads(b["merger.lock.json"])
    assert lock["recipe"] == (tmp_path / "recipe.yaml").read_text() and lock["merger_version"] == "0.1.0"
    by_ref = {i["refs"][0]: i for i in lock["inputs"]}
    assert by_ref["org/ft1@v1"]["commit"] == commits["ft1"] and by_ref["org/ft1@v1"]["repo_id"] == "org/ft1"
    shard = local["ft1"] / "model-00001-of-00003.safetensors"
    assert by_ref["org/ft1@v1"]["files"][shard.name] == {
        "sha256": hashlib.sha256(shard.read_bytes()).hexdigest(),
        "size": shard.stat().st_size,
    }
    assert (
        "tokenizer.json" in by_ref["org/base"]["files"] and "README.md" in by_ref["org/ft2@" + commits["ft2"]]["files"]
    )
    local_lock = json.loads(a["merger.lock.json"])
    assert [i["refs"] for i in local_lock["inputs"]] == [[str(local[n])] for n in ("base", "ft1", "ft2")]
    assert "commit" not in local_lock["inputs"][0]


def test_plan_reads_remote_headers_only(tmp_path, hub, models, hf_home):
    _, commits = models
    (tmp_path / "recipe.yaml").write_text(recipe(hub_refs(commits)))
    info = json.loads(run("plan", str(tmp_path / "recipe.yaml"), "--json").stdout)
    assert info["commits"] == {
        "org/base": commits["base"],
        "org/ft1@v1": commits["ft1"],
        "org/ft2@" + commits["ft2"]: commits["ft2"],
    }
    weights = [(m, p, r) for m, p, r in hub.log if p.endswith(".safetensors")]
    assert weights and all(m == "GET" and r.startswith("bytes=0-") for m, p, r in weights)
    assert hub.downloads() == [f"/org/base/resolve/{commits['base']}/model.safetensors.index.json",
                               f"/org/ft1/resolve/{commits['ft1']}/model.safetensors.index.json"]  # fmt: skip
    assert cached_weights(hf_home) == []
    disk = info["disk"]
    assert disk["download_bytes"] > 0 and disk["output_bytes"] > 0
    assert disk["peak_bytes"] == disk["download_bytes"] + disk["output_bytes"] > disk["low_disk_peak_bytes"]
    human = run("plan", str(tmp_path / "recipe.yaml")).output
    assert f"org/ft1@v1 at commit {commits['ft1']}" in human and "with --low-disk" in human


def test_shape_mismatch_found_before_any_weight_is_downloaded(tmp_path, hub, models, hf_home, monkeypatch):
    local, commits = models
    odd = write_checkpoint(
        tmp_path / "odd",
        {k: torch.zeros(s[0], s[-1] + 1) for k, s in SHAPES.items()} | {"position_ids": torch.arange(6)},
    )
    hub.publish("org/odd", odd)
    monkeypatch.chdir(tmp_path)
    Path("recipe.yaml").write_text(recipe(hub_refs(commits) | {"ft2": "org/odd"}))
    before = sorted(os.listdir("."))
    result = run("apply", "recipe.yaml", "-o", "out", code=2)
    assert result.stderr.startswith(
        "error: recipe.yaml:6: models[1].model: tensor 'embed.weight' has shape [12, 9] in 'org/odd' but [12, 8] in 'org/base'\n"
    )
    assert sorted(os.listdir(".")) == before
    assert not [p for p in hub.downloads() if p.endswith("model.safetensors") or "-of-" in p]
    assert cached_weights(hf_home) == []


@pytest.mark.parametrize(
    "case",
    ["unknown repo", "unknown revision", "gated without token", "gated with a token that has no access",
     "network down", "file missing from the remote", "file missing at download time", "private without token"],
)  # fmt: skip
def test_hub_failures(tmp_path, hub, models, hf_home, monkeypatch, case):
    _, commits = models
    refs = hub_refs(commits)
    endpoint = hub.url
    if case == "unknown repo":
        refs["ft1"] = "org/nope"
        want = f"'org/nope': no such directory in the working directory ({tmp_path}), nor a model of that name on the Hub ({endpoint}); if it is a private model, set HF_TOKEN or run `hf auth login` (`huggingface-cli login` in older versions) with a token that can read it"
    elif case == "unknown revision":
        refs["ft1"] = "org/ft1@v9"
        want = "'org/ft1@v9': org/ft1 has no revision 'v9' (a branch, tag or commit)"
    elif case.startswith("gated"):
        hub.publish("org/gated", hub.repos["org/ft1"].commits[commits["ft1"]], gated=True)
        refs["ft1"] = "org/gated"
        if "with a token" in case:
            monkeypatch.setenv("HF_TOKEN", "hf_WRONGtokenNOaccess000000000000")
            want = (
                f"'org/gated' is gated and the token in use has no access to it; request access at {endpoint}/org/gated"
            )
        else:
            want = f"'org/gated' is gated: request access at {endpoint}/org/gated, then set HF_TOKEN or run `hf auth login` (`huggingface-cli login` in older versions)"
    elif case == "private without token":
        hub.publish("org/secret", hub.repos["org/ft1"].commits[commits["ft1"]], private=True)
        refs["ft1"] = "org/secret"
        want = f"'org/secret': no such directory in the working directory ({tmp_path}), nor a model of that name on the Hub ({endpoint}); if it is a private model, set HF_TOKEN or run `hf auth login` (`huggingface-cli login` in older versions) with a token that can read it"
    elif case == "network down":
        endpoint = f"http://127.0.0.1:{closed_port()}"
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        want = (
            f"'org/base': no such directory in the working directory ({tmp_path}), and the Hub at {endpoint} cannot "
            "be reached to look for a model of that name; check the path, or the network (--offline uses the "
            "Hugging Face cache alone)"
        )
    elif case == "file missing from the remote":
        hub.repos["org/ft1"].lost.add("model-00002-of-00003.safetensors")
        want = f"'org/ft1@v1': model-00002-of-00003.safetensors is missing from the repo at {commits['ft1'][:12]}"
    if case == "file missing at download time":
        hub.repos["org/base"].lost.add("config.json")  # listed, not needed to plan, 404 when fetched
        where = ""
        want = f"'org/base': config.json is missing from the repo at {commits['base'][:12]}"
    else:
        where = "recipe.yaml:2: base_model: " if case == "network down" else "recipe.yaml:4: models[0].model: "
    monkeypatch.chdir(tmp_path)
    Path("recipe.yaml").write_text(recipe(refs))
    before = sorted(os.listdir("."))
    result = run("apply", "recipe.yaml", "-o", "out", code=2)
    assert result.stderr.splitlines()[0] == f"error: {where}{want}"
    assert sorted(os.listdir(".")) == before
    assert cached_weights(hf_home) == []


def test_gated_repo_with_token_and_the_token_is_never_shown(tmp_path, hub, models, hf_home, monkeypatch):
    local, commits = models
    hub.publish("org/gated", _files(local["ft1"]), gated=True)
    monkeypatch.setenv("HF_TOKEN", hub.token)
    text = recipe(hub_refs(commits) | {"ft1": "org/gated"})
    (tmp_path / "recipe.yaml").write_text(text)
    shown = run("plan", str(tmp_path / "recipe.yaml")).output
    shown += apply(tmp_path, text, tmp_path / "out", "--json").output
    assert hub.token not in shown
    for name, data in tree(tmp_path / "out").items():
        assert hub.token.encode() not in data, name
    for p in hf_home.rglob("*"):
        assert not p.is_file() or hub.token.encode() not in p.read_bytes(), p


def test_offline_uses_the_cache_alone(tmp_path, hub, models, hf_home, monkeypatch):
    _, commits = models
    text = recipe(hub_refs(commits) | {"ft1": "org/ft1"})
    (tmp_path / "recipe.yaml").write_text(text)
    run("plan", str(tmp_path / "recipe.yaml"))  # caches the indexes only
    err = apply(tmp_path, text, tmp_path / "b" / "out", "--offline", code=2).stderr
    assert err.startswith(
        "error: " + str(tmp_path / "recipe.yaml") + ":2: base_model: 'org/base': model.safetensors.index.json names "
        "model-00001-of-00003.safetensors, model-00002-of-00003.safetensors, model-00003-of-00003.safetensors, which the Hugging Face cache ("
    )
    assert "; run once without --offline to download it" in err
    assert not (tmp_path / "b").exists()

    apply(tmp_path, text, tmp_path / "a" / "out")
    hub.log.clear()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    apply(tmp_path, text, tmp_path / "b" / "out", "--offline")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    apply(tmp_path, text, tmp_path / "c" / "out")
    assert hub.log == []
    assert tree(tmp_path / "a" / "out") == tree(tmp_path / "b" / "out") == tree(tmp_path / "c" / "out")

    err = apply(tmp_path, recipe(hub_refs(commits) | {"ft1": "org/never-fetched"}), tmp_path / "d", code=2).stderr
    assert err == (
        f"error: {tmp_path / 'recipe.yaml'}:4: models[0].model: 'org/never-fetched': no such directory in the "
        f"working directory ({os.getcwd()}), and no model of that name is in the Hugging Face cache "
        f"({hf_home / 'hub'}); merger is offline: run once without --offline (and HF_HUB_OFFLINE unset) to "
        "download it\n"
    )


def test_low_disk_fetches_shard_by_shard_and_drops_each(tmp_path, hub, models, hf_home, monkeypatch):
    from huggingface_hub import hf_hub_download

    import merger.hub

    _, commits = models
    text = recipe(hub_refs(commits))
    apply(tmp_path, text, tmp_path / "a" / "out")
    total = sum(p.stat().st_size for p in cached_weights(hf_home))
    shutil.rmtree(hf_home / "hub")  # an empty cache again
    kept = hf_hub_download(
        "org/base",
        "model-00001-of-00003.safetensors",
        revision=commits["base"],
        endpoint=hub.url,
        cache_dir=hf_home / "hub",
    )

    seen = []
    fetch = merger.hub.Remote.fetch

    def measured(self, name):
        path = fetch(self, name)
        seen.append(sum(p.stat().st_size for p in cached_weights(hf_home)))
        return path

    monkeypatch.setattr(merger.hub.Remote, "fetch", measured)
    (tmp_path / "recipe.yaml").write_text(text)
    disk = json.loads(run("plan", str(tmp_path / "recipe.yaml"), "--json").stdout)["disk"]
    apply(tmp_path, text, tmp_path / "b" / "out", "--low-disk")
    assert tree(tmp_path / "a" / "out") == tree(tmp_path / "b" / "out")
    assert [p.name for p in cached_weights(hf_home)] == [Path(kept).resolve().name]  # was cached: stays
    assert Path(kept).exists()
    assert 0 < max(seen) < total, (seen, total)
    assert max(seen) <= disk["low_disk_peak_bytes"] < disk["peak_bytes"]


def _free(monkeypatch, free_at) -> None:
    """merger.fetch's view of the filesystems: free_at(folder) -> (device id, free bytes)."""
    import merger.fetch

    monkeypatch.setattr(merger.fetch, "_volume", lambda path: (*free_at(path), path))


def test_downloads_and_output_too_large_for_the_disk_are_refused_before_any_download(
    tmp_path, hub, models, hf_home, monkeypatch
):
    """On one filesystem the Hub files and the output need room together: too little is refused before
    anything is downloaded, with --low-disk's figure where that fits; --low-disk then merges."""
    from merger.errors import sized

    _, commits = models
    text = recipe(hub_refs(commits))
    (tmp_path / "recipe.yaml").write_text(text)
    disk = json.loads(run("plan", str(tmp_path / "recipe.yaml"), "--json").stdout)["disk"]
    low = disk["low_disk_peak_bytes"]
    assert low < disk["peak_bytes"]
    _free(monkeypatch, lambda path: (1, low))
    out = tmp_path / "out"
    result = apply(tmp_path, text, out, code=2)
    assert result.stderr == (
        f"error: output {out}: the output and the Hub downloads need {sized(disk['peak_bytes'])}, and {tmp_path} "
        f"has {sized(low)} free: free some space there, add --low-disk (then at most {sized(low)}) or write the "
        "output elsewhere\n"
    )
    assert cached_weights(hf_home) == [] and not out.exists()
    apply(tmp_path, text, out, "--low-disk")
    assert out.is_dir()


def test_downloads_on_another_filesystem_need_room_there(tmp_path, hub, models, hf_home, monkeypatch):
    """Where the Hub cache lies on another filesystem than the output, each is held to its own free space."""
    from merger.errors import sized

    _, commits = models
    (tmp_path / "recipe.yaml").write_text(recipe(hub_refs(commits)))
    plan = ["plan", str(tmp_path / "recipe.yaml"), "-o", str(tmp_path / "out"), "--json"]
    disk = json.loads(run(*plan).stdout)["disk"]
    downloads, output = disk["download_bytes"], disk["output_bytes"]

    def free(hub_free: int, out_free: int):
        return lambda path: (2, hub_free) if str(path).startswith(str(hf_home)) else (1, out_free)

    _free(monkeypatch, free(downloads, output))  # each fits on its own: nothing short
    assert json.loads(run(*plan).stdout)["disk_short"] == []
    _free(monkeypatch, free(downloads - 100, output - 100))  # sizes in KB: less by a figure shown
    cache = hf_home / "hub"
    assert json.loads(run(*plan).stdout)["disk_short"] == [
        f"the Hub downloads need {sized(downloads)} in the Hugging Face cache ({cache}), and {cache} has "
        f"{sized(downloads - 100)} free: free some space there, add --low-disk or point HF_HUB_CACHE elsewhere",
        f"output {tmp_path / 'out'}: the output needs {sized(output)}, and {tmp_path} has {sized(output - 100)} free: "
        "free some space there or write the output elsewhere",
    ]


@pytest.mark.parametrize("low_disk", [False, True])
def test_an_interrupted_hub_merge_resumes(tmp_path, hub, models, hf_home, monkeypatch, low_disk):
    """Interrupted after two shards, the same command finishes the merge: the output is the one an
    uninterrupted run writes, and (with --low-disk) only the Hub shards the rest of the merge reads are
    downloaded again."""
    import merger.hub
    import merger.stream

    _, commits = models
    text = recipe(hub_refs(commits))
    apply(tmp_path, text, tmp_path / "a" / "out")
    shutil.rmtree(hf_home / "hub")
    flag = ["--low-disk"] if low_disk else []

    release = merger.stream.Merger.release
    released = []

    def interrupted(self, t):  # Ctrl-C, once the first shard's tensors are merged
        release(self, t)
        released.append(t.name)
        if len(released) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(merger.stream.Merger, "release", interrupted)
    first = apply(tmp_path, text, tmp_path / "b" / "out", *flag, code=130)
    kept = int(first.stderr.split("; ")[1].split()[0])
    assert 1 <= kept < 3 and "of 3 shards are done and kept in" in first.stderr, first.stderr
    monkeypatch.setattr(merger.stream.Merger, "release", release)
    fetched = []
    fetch = merger.hub.Remote.fetch
    monkeypatch.setattr(merger.hub.Remote, "fetch", lambda self, name: fetched.append(name) or fetch(self, name))
    apply(tmp_path, text, tmp_path / "b" / "out", *flag)
    assert tree(tmp_path / "a" / "out") == tree(tmp_path / "b" / "out")
    weights = [n for n in fetched if n.endswith(".safetensors")]
    if low_disk:
        assert 0 < len(weights) < 7  # of the 3 + 3 + 1 input shards
        assert cached_weights(hf_home) == []  # the ones the first run fetched and left are dropped too


def test_low_disk_runs_in_one_process(tmp_path, hub, models):
    _, commits = models
    err = apply(tmp_path, recipe(hub_refs(commits)), tmp_path / "out", "--low-disk", "--workers", "2", code=2).stderr
    assert err == "error: --low-disk fetches and deletes Hub shards in one process; leave out --workers\n"
    assert not (tmp_path / "out").exists() and hub.downloads() == [
        f"/org/{n}/resolve/{commits[n]}/model.safetensors.index.json" for n in ("base", "ft1")
    ]


def test_locked_rerun_is_byte_identical_after_the_branch_moved(tmp_path, hub, models):
    local, commits = models
    text = recipe(hub_refs(commits) | {"ft1": "org/ft1"})
    apply(tmp_path, text, tmp_path / "a" / "out")
    lock = tmp_path / "a" / "out" / "merger.lock.json"
    moved = _files(local["ft1"]) | {"model-00001-of-00003.safetensors": _files(local["ft2"])["model.safetensors"]}
    hub.publish("org/ft1", moved)  # main moves on, to a model with different weights

    run("apply", "--locked", str(lock), "-o", str(tmp_path / "b" / "out"), "--quiet")
    assert tree(tmp_path / "a" / "out") == tree(tmp_path / "b" / "out")
    apply(tmp_path, text, tmp_path / "c" / "out")  # unlocked: the new main
    a, c = tree(tmp_path / "a" / "out"), tree(tmp_path / "c" / "out")
    assert any(a[n] != c[n] for n in a if n.startswith("model-0"))


def test_locked_local_inputs_are_checked(tmp_path, models, monkeypatch):
    local, _ = models
    monkeypatch.chdir(tmp_path / "local")
    text = recipe({"base": "base", "ft1": "ft1", "ft2": "ft2"})
    Path("recipe.yaml").write_text(text)
    run("apply", "recipe.yaml", "-o", "../a/out", "--quiet")
    run("apply", "--locked", "../a/out/merger.lock.json", "-o", "../b/out", "--quiet")
    assert tree(tmp_path / "a" / "out") == tree(tmp_path / "b" / "out")

    shard = Path("ft1/model-00002-of-00003.safetensors")
    old = hashlib.sha256(shard.read_bytes()).hexdigest()
    data = bytearray(shard.read_bytes())
    data[-4:] = b"\x00\x00\x80\x3f"
    shard.write_bytes(bytes(data))
    new = hashlib.sha256(bytes(data)).hexdigest()
    err = run("apply", "--locked", "../a/out/merger.lock.json", "-o", "../c/out", code=2).stderr
    assert err == (
        f"error: ../a/out/merger.lock.json: 'ft1': {shard.name} has changed since the lock "
        f"(sha256 {old[:12]}, {len(data)} bytes then, sha256 {new[:12]}, {len(data)} bytes now)\n"
    )
    assert not (tmp_path / "c").exists()
    err = run("apply", "recipe.yaml", "--locked", "../a/out/merger.lock.json", code=2).stderr
    assert err == (
        "error: give a RECIPE or --locked LOCK, not both: --locked re-runs the recipe ../a/out/merger.lock.json holds\n"
    )
    Path("bad.json").write_text('{"recipe": "x"}')
    err = run("apply", "--locked", "bad.json", code=2).stderr
    assert err.startswith("error: bad.json: not a merger lock file (merger_version: ")


def test_low_disk_keeps_a_shard_that_an_overlapping_slice_reads_again(tmp_path, hub, models, hf_home):
    """layers.1.w feeds output layers 1 and 2: its shard is dropped after its second read, not its first."""
    _, commits = models
    text = (
        "merge_method: passthrough\nslices:\n"
        "  - sources: [{model: org/ft1@v1, layer_range: [0, 2]}]\n"
        "  - sources: [{model: org/ft1@v1, layer_range: [1, 2]}]\n"
    )
    apply(tmp_path, text, tmp_path / "a" / "out")
    shutil.rmtree(hf_home / "hub")
    apply(tmp_path, text, tmp_path / "b" / "out", "--low-disk")
    assert tree(tmp_path / "a" / "out") == tree(tmp_path / "b" / "out")
    out = load_output(tmp_path / "b" / "out")
    assert torch.equal(out["layers.2.w"], out["layers.1.w"]) and "layers.3.w" not in out
    assert cached_weights(hf_home) == []  # every shard fetched was dropped after its last read


def test_a_cached_blob_is_hashed_once_and_again_once_it_changes(tmp_path, hub, models, hf_home, monkeypatch):
    """The Hub's files are checked against the sha256 it lists once (merger.hashes remembers it); a blob
    changed in the cache after that is read again and refused."""
    from merger import hashes
    from merger.files import Folder

    monkeypatch.setattr(hashes, "SETTLED", 0.0)
    reads: list[str] = []
    real = Folder.hash
    monkeypatch.setattr(Folder, "hash", lambda self, name, stop=None: reads.append(name) or real(self, name, stop))
    _, commits = models
    apply(tmp_path, recipe(hub_refs(commits)), tmp_path / "out")
    assert len(reads) == len(cached_weights(hf_home)) > 5
    reads.clear()
    apply(tmp_path, recipe(hub_refs(commits)), tmp_path / "out", "--force")
    assert reads == []
    blob = max(cached_weights(hf_home), key=lambda p: p.stat().st_size)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 1
    blob.write_bytes(bytes(data))
    before = tree(tmp_path / "out")
    result = apply(tmp_path, recipe(hub_refs(commits)), tmp_path / "out", "--force", code=2)
    assert len(reads) == 1 and tree(tmp_path / "out") == before
    assert result.stderr.startswith("error: 'org/")
    assert "is not the file the Hub lists at " in result.stderr
    assert f"(sha256 {hashlib.sha256(bytes(data)).hexdigest()[:12]}, " in result.stderr
    assert f"expected sha256 {blob.name[:12]}, " in result.stderr
