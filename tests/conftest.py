"""Fixtures: tiny checkpoints written with safetensors' own writer, split over shards on purpose."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from merger.cli import cli

# One recipe per method over the `family` fixture's models (format with their paths): the GPU tests
# compare each method's result on the GPU, or the fake one, with the CPU's.
RECIPES = {
    "linear": "merge_method: linear\nmodels: [{{model: {ft1}, parameters: {{weight: 0.7}}}}, {{model: {ft2}}}]\n",
    "task_arithmetic": "merge_method: task_arithmetic\nbase_model: {base}\n"
    "models: [{{model: {ft1}, parameters: {{weight: 0.7}}}}, {{model: {ft2}, parameters: {{weight: -0.2}}}}]\n",
    "ties": "merge_method: ties\nbase_model: {base}\n"
    "models: [{{model: {ft1}, parameters: {{density: 0.3}}}}, {{model: {ft2}, parameters: {{density: 0.6}}}}]\n",
}


def _template(yaml: str) -> str:
    """A recipe written with BASE, FT1 and FT2 for the models, as a RECIPES template."""
    escaped = yaml.replace("{", "{{").replace("}", "}}")
    return escaped.replace("BASE", "{base}").replace("FT1", "{ft1}").replace("FT2", "{ft2}")


def _recipe(*per_model: str, wide: str = "", base: bool = True) -> str:
    """The base (unless not `base`) and FT1, FT2... with these parameters each ("": none), and `wide`
    for the method."""
    models = ", ".join(
        f"{{model: FT{i + 1}" + (f", parameters: {{{p}}}" if p else "") + "}" for i, p in enumerate(per_model)
    )
    text = ("base_model: BASE\n" if base else "") + f"models: [{models}]\n"
    return _template(text + (f"parameters: {{{wide}}}\n" if wide else ""))


_OTHERS = {  # every other method (greedy soup needs an evaluator), for the same checks
    "slerp": _recipe("", wide="t: 0.3"),
    "nearswap": _recipe("", wide="t: 0.1"),
    "arcee_fusion": _recipe(""),
    "passthrough": _recipe("scale: 0.5", base=False),
    "karcher": _recipe("", "", base=False),
    "nuslerp": _recipe("weight: 0.7", "weight: 0.4"),
    "multislerp": _recipe("weight: 0.7", "weight: 0.4"),
    "dare_linear": _recipe("weight: 0.7, density: 0.4", "weight: 0.5, density: 0.7"),
    "dare_ties": _recipe("weight: 0.7, density: 0.4", "weight: 0.5, density: 0.7"),
    "breadcrumbs": _recipe("weight: 0.7, density: 0.8, gamma: 0.05", "weight: 0.5, density: 0.6, gamma: 0.1"),
    "breadcrumbs_ties": _recipe("weight: 0.7, density: 0.8, gamma: 0.05", "weight: 0.5, density: 0.6"),
    "della": _recipe("weight: 0.7, density: 0.4, epsilon: 0.1", "weight: 0.5, density: 0.7, epsilon: 0.2"),
    "della_linear": _recipe("weight: 0.7, density: 0.4, epsilon: 0.1", "weight: 0.5, density: 0.6"),
    "sce": _recipe("", "", wide="select_topk: 0.5"),
    "model_stock": _recipe("", ""),
    "ram": _recipe("", "", wide="epsilon: 0.05"),  # some entries changed in one model alone: rho below alpha too
    "ramplus_tl": _recipe("", "", wide="epsilon: 0.05, r: 0.5, alpha: 0.3"),
    "tsv": _recipe("", "", wide="alpha: 0.8"),
    "iso_c": _recipe("", "", wide="alpha: 1.2"),
    "iso_cts": _recipe("", "", wide="alpha: 1.1, common_space_fraction: 0.5"),
}
RECIPES |= {method: f"merge_method: {method}\n" + text for method, text in _OTHERS.items()}


def write_checkpoint(
    directory: Path,
    tensors: dict[str, torch.Tensor],
    n_shards: int = 2,
    config: dict | None = None,
    interleave: bool = True,
) -> Path:
    """Save `tensors` as `n_shards` safetensors files plus an index (one file, no index, if n_shards == 1).
    Shards interleave the names unless `interleave` is False (then each holds a run, as transformers writes)."""
    directory.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    if n_shards == 1:
        save_file(
            {k: tensors[k].contiguous() for k in names}, directory / "model.safetensors", metadata={"format": "pt"}
        )
    else:
        weight_map = {}
        for i in range(n_shards):
            step = -(-len(names) // n_shards)
            part = names[i::n_shards] if interleave else names[i * step : (i + 1) * step]
            fname = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
            save_file({k: tensors[k].contiguous() for k in part}, directory / fname, metadata={"format": "pt"})
            weight_map |= {k: fname for k in part}
        (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(config or {"model_type": "toy", "torch_dtype": "float32"}))
    return directory


def hooked(tmp_path: Path, code: str) -> dict[str, str]:
    """Environment variables under which every Python process runs `code` at start-up (a sitecustomize):
    to make one process of a merge fail, or be killed, at a chosen point, the way a real one might."""
    hook = Path(tempfile.mkdtemp(prefix="hook-", dir=tmp_path))
    (hook / "sitecustomize.py").write_text(code)
    return {"PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")])}


def six_shard_ties(root: Path) -> Path:
    """A TIES recipe over a bf16 base and two fine-tunes (12 tensors of 64x64 and an int buffer, the
    fine-tunes in three shards each) whose output is six shards of 20 KB: small, yet several shards
    for workers, ranks and resumes to share. Returns the recipe's path."""
    g = torch.Generator().manual_seed(0)
    base = {f"layers.{i}.w": torch.randn(64, 64, generator=g).bfloat16() for i in range(12)}
    base["ids"] = torch.arange(10)
    write_checkpoint(root / "base", base)
    for m in (1, 2):
        ft = {k: (v.float() + 0.1 * torch.randn(v.shape, generator=g)).bfloat16() if v.is_floating_point() else v
              for k, v in base.items()}  # fmt: skip
        write_checkpoint(root / f"ft{m}", ft, n_shards=3)
    recipe = root / "r.yaml"
    recipe.write_text(
        f"merge_method: ties\nbase_model: {root / 'base'}\n"
        f"models: [{{model: {root / 'ft1'}, parameters: {{density: 0.3}}}}, {{model: {root / 'ft2'}}}]\n"
        "output: {shard_size: 20KB}\n"
    )
    return recipe


# SIGKILL the process as it calls $KILL_IN (module:function, or module:Class.method) for the $KILL_AT-th time.
KILL_IN = """
import importlib, os, signal
module, _, name = os.environ["KILL_IN"].partition(":")
owner, _, attr = name.rpartition(".")
target = importlib.import_module(module)
for part in filter(None, owner.split(".")):
    target = getattr(target, part)
original = getattr(target, attr)
calls = [0]

def killed(*args, **kwargs):
    calls[0] += 1
    if calls[0] == int(os.environ.get("KILL_AT", "1")):
        os.kill(os.getpid(), signal.SIGKILL)
    return original(*args, **kwargs)

setattr(target, attr, killed)
"""


def alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, dead and waiting to be reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def load_output(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a merged output, through its index and safetensors' own reader."""
    from safetensors.torch import load_file

    index = json.loads((directory / "model.safetensors.index.json").read_text())
    out = {}
    for fname in sorted(set(index["weight_map"].values())):
        out |= load_file(directory / fname)
    assert set(out) == set(index["weight_map"])
    return out


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: a test of the CUDA path on a real GPU (skips without one)")


@pytest.fixture(autouse=True)
def cpu_only(request, monkeypatch):
    """Every test not marked `cuda` is a CPU test: on a machine with a GPU, `device: auto` must still mean
    the CPU for it, in this process and in the merger processes it starts."""
    if request.node.get_closest_marker("cuda"):
        return
    import merger.plan

    monkeypatch.setattr(merger.plan, "cuda_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


@pytest.fixture(autouse=True)
def hf_home(tmp_path_factory, monkeypatch):
    """No test reaches the real Hub, the user's cache or token: the Hub is a closed local port (tests that
    need one start the fake Hub), the cache a fresh directory, and there is no token."""
    import huggingface_hub.constants

    home = tmp_path_factory.mktemp("hf_home")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(home / "hub"))
    return home


@pytest.fixture
def family(tmp_path: Path):
    """A base model and three fine-tunes of it (float32, two shards each, an int64 buffer)."""
    g = torch.Generator().manual_seed(0)
    shapes = {"embed.weight": (12, 8), "layers.0.w": (8, 8), "layers.1.w": (8, 8), "layers.10.w": (8, 8), "norm": (8,)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    base["position_ids"] = torch.arange(6)
    paths = {"base": write_checkpoint(tmp_path / "base", base)}
    models = {"base": base}
    for i in (1, 2, 3):
        ft = {k: v + 0.5 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in base.items()}
        paths[f"ft{i}"] = write_checkpoint(tmp_path / f"ft{i}", ft, n_shards=1 + i % 3)
        models[f"ft{i}"] = ft
    return paths, models


@pytest.fixture(scope="session")
def _kernel_cache(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One compiled-kernel cache for the run, kept in pytest's cache between runs (numba compiles each
    kernel once, not once per test; about 30 s on 2 cores)."""
    cache = getattr(request.config, "cache", None)
    path = cache.mkdir("merger-kernels") if cache is not None else tmp_path_factory.mktemp("numba")
    path.chmod(0o700)
    return path


@pytest.fixture(autouse=True)
def _merger_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch, _kernel_cache) -> None:
    """merger's caches (file hashes, greedy soup scores) go to a fresh directory, never ~/.cache; its
    compiled kernels to the run's one cache (a link to it, which merger accepts as it is private)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
    cache = tmp_path_factory.mktemp("merger-cache")
    cache.chmod(0o700)
    (cache / "numba").symlink_to(_kernel_cache)
    monkeypatch.setenv("MERGER_CACHE_DIR", str(cache))


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """Three small models in the working directory, referenced by relative paths as users write them."""
    monkeypatch.chdir(tmp_path)
    t = {"a.weight": torch.ones(4, 4), "b.bias": torch.zeros(4), "ids": torch.arange(3)}
    write_checkpoint(Path("base"), t)
    write_checkpoint(Path("ft1"), {k: v + 1 if v.is_floating_point() else v for k, v in t.items()})
    write_checkpoint(Path("ft2"), {k: v - 1 if v.is_floating_point() else v for k, v in t.items()}, n_shards=1)
    return tmp_path


GOOD = """\
merge_method: ties
base_model: base
models:
  - model: ft1
    parameters:
      weight: 1.0
      density: 0.5
  - model: ft2
    parameters:
      weight: 0.5
output:
  path: out
"""


def run_bad(recipe: str, *args: str, command: str = "apply") -> str:
    Path("recipe.yaml").write_text(recipe)
    before = sorted(os.listdir("."))
    result = CliRunner().invoke(cli, [command, "recipe.yaml", *args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert sorted(os.listdir(".")) == before, "something was written"
    return result.stderr
