"""Benchmark merger (and mergekit, when installed) against the I/O limit on synthetic checkpoints of real shapes.

    python benchmarks/bench_merge.py --shape tinyllama            # 3 x 2.2 GB bf16 inputs, CPU
    python benchmarks/bench_merge.py --shape llama2-7b --device cuda
    python benchmarks/bench_merge.py --shape small --repeat 1     # a quick smoke run (~30 MB)
    python benchmarks/bench_merge.py --shape 3b --devices cuda,cpu   # GPU and CPU runs alternating

mergekit is optional: install it in its own environment (`python -m venv /tmp/mk && /tmp/mk/bin/pip install
torch==2.13.0 mergekit`) and pass `--mergekit-bin /tmp/mk/bin/mergekit-yaml`, or have mergekit-yaml on PATH.

Checkpoints (a base and N fine-tunes, bf16, sharded, with a real Llama config) are generated once
into --dir and reused. Each method first gets one untimed merger run (numba compiles its kernels on
a machine's first merge and caches them, as Python caches merger's compiled modules, PYTHONDONTWRITEBYTECODE
cleared; this also warms the page cache). Then come --repeat rounds,
each running every method once in turn: the I/O limit (io_stream.py: the method's inputs read and one
output of the merged size written and flushed, streamed as a merge streams them, computing nothing), then
merger, then mergekit on the same recipe, each as its own process started --settle seconds after the last
deletion (see its help); peak RSS is the process's high-water mark. The table lists every run, then the
best of each tool's runs per method, then each merger run's merge s over the I/O limit's and (with ties
among the methods) over TIES', each of the same round: this VM's speed drifts over minutes, so runs
seconds apart compare best.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

SHAPES = {
    # name: (vocab, hidden, intermediate, layers, heads, kv_heads)
    "tiny": (256, 64, 176, 2, 4, 2),  # 0.25 MB a model: for checks of the scripts themselves
    "small": (4096, 512, 1408, 4, 8, 2),
    "tinyllama": (32000, 2048, 5632, 22, 32, 4),
    "3b": (32000, 3200, 8640, 26, 32, 32),
    "llama2-7b": (32000, 4096, 11008, 32, 32, 32),
}


def llama_tensors(shape: str) -> list[tuple[str, tuple[int, ...]]]:
    vocab, h, inter, layers, heads, kv = SHAPES[shape]
    kv_dim = h // heads * kv
    out = [("model.embed_tokens.weight", (vocab, h))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv_dim, h)),
            (p + "self_attn.v_proj.weight", (kv_dim, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (inter, h)),
            (p + "mlp.up_proj.weight", (inter, h)),
            (p + "mlp.down_proj.weight", (h, inter)),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (vocab, h))]
    return out


def llama_config(shape: str) -> dict:
    vocab, h, inter, layers, heads, kv = SHAPES[shape]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": h,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }


def generate(root: Path, shape: str, n_finetunes: int, shard_size: int) -> list[Path]:
    """base, ft-1..ft-N: bf16, sharded, written with merger's own streaming shard writer."""
    import torch

    from merger.plan import OutTensor, layout
    from merger.stream import ShardWriter

    planned = [OutTensor(n, s, "BF16", True, 2 * _numel(s)) for n, s in llama_tensors(shape)]
    shards = layout(planned, shard_size)
    dirs = []
    for m in range(n_finetunes + 1):
        d = root / shape / ("base" if m == 0 else f"ft-{m}")
        dirs.append(d)
        if (d / "model.safetensors.index.json").exists():
            continue
        print(f"generating {d} ...", file=sys.stderr, flush=True)
        tmp = d.with_name(d.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for shard in shards:
            w = ShardWriter(tmp / shard.filename, shard.tensors)
            for t in shard.tensors:
                g = torch.Generator().manual_seed(zlib.crc32(t.name.encode()))
                x = torch.randn(t.shape, generator=g) * 0.02
                if m:  # a fine-tune: the base plus a small task vector
                    g2 = torch.Generator().manual_seed(zlib.crc32(f"{t.name}/{m}".encode()))
                    x += torch.randn(t.shape, generator=g2) * 0.002
                w.write(t, x.bfloat16().view(torch.int16).numpy())  # bf16 bits, as ShardWriter takes them
            w.close()
        index = {"metadata": {}, "weight_map": {t.name: s.filename for s in shards for t in s.tensors}}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index))
        (tmp / "config.json").write_text(json.dumps(llama_config(shape)))
        tmp.rename(d)
    return dirs


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# Each method's benchmark recipe, with mergekit's parameter names: (which models it reads: "all" every model
# as an ingredient, "tasks" the base and the fine-tunes as task vectors, "pair" the base and the first
# fine-tune, "one" the first fine-tune alone; per-model parameters; method-wide parameters).
RECIPES: dict[str, tuple[str, str, str]] = {
    "linear": ("all", "weight: 1.0", ""),
    "task_arithmetic": ("tasks", "weight: 0.5", "lambda: 1.0"),
    "ties": ("tasks", "weight: 0.5, density: 0.5", "lambda: 1.0"),
    "slerp": ("pair", "", "t: 0.5"),
    "nuslerp": ("tasks", "weight: 0.5", ""),
    "multislerp": ("tasks", "weight: 0.5", ""),
    "karcher": ("all", "", ""),
    "nearswap": ("pair", "", "t: 0.001"),
    "dare_linear": ("tasks", "weight: 0.5, density: 0.5", ""),
    "dare_ties": ("tasks", "weight: 0.5, density: 0.5", ""),
    "breadcrumbs": ("tasks", "weight: 0.5, density: 0.9, gamma: 0.01", ""),
    "breadcrumbs_ties": ("tasks", "weight: 0.5, density: 0.9, gamma: 0.01", ""),
    "della": ("tasks", "weight: 0.5, density: 0.5, epsilon: 0.1", "lambda: 1.0"),
    "della_linear": ("tasks", "weight: 0.5, density: 0.5, epsilon: 0.1", "lambda: 1.0"),
    "sce": ("tasks", "", "select_topk: 0.5"),
    "model_stock": ("tasks", "", ""),
    "arcee_fusion": ("pair", "", ""),
    "ram": ("tasks", "", ""),
    "ramplus_tl": ("tasks", "", ""),
    "passthrough": ("one", "", ""),
    "tsv": ("tasks", "", ""),
    "iso_c": ("tasks", "", ""),
    "iso_cts": ("tasks", "", ""),
}
MERGEKIT_LACKS = {"tsv", "iso_c", "iso_cts"}  # merger's own: no mergekit run to compare with


def recipe(method: str, dirs: list[Path], out: Path) -> str:
    """method's benchmark recipe over dirs (the base first), bfloat16 out."""
    reads, per_model, wide = RECIPES[method]
    base, fts = dirs[0], dirs[1:]
    listed = {"all": dirs, "tasks": fts, "pair": fts[:1], "one": fts[:1]}[reads]
    params = f"\n    parameters: {{{per_model}}}" if per_model else ""
    models = "\n".join(f"  - model: {d}{params}" for d in listed)
    text = f"merge_method: {method}\n" + (f"base_model: {base}\n" if reads in ("tasks", "pair") else "")
    text += f"models:\n{models}\n" + (f"parameters: {{{wide}}}\n" if wide else "")
    return text + "dtype: bfloat16\n"


def read_by(method: str, dirs: list[Path]) -> list[Path]:
    """The models method's recipe reads (the I/O limit reads those)."""
    reads = RECIPES[method][0]
    return dirs[:2] if reads == "pair" else dirs[1:2] if reads == "one" else dirs


# Runs a command and appends "wall_seconds peak_rss_kib exit_code" to stderr. Commands start through it
# because a child's ru_maxrss begins at the high-water mark of the process that forked it: the
# benchmark process itself grows to GBs while generating a 7B checkpoint, this one stays small.
_TIMER = """
import os, subprocess, sys, time
t = time.perf_counter()
child = subprocess.Popen(sys.argv[1:])
_, status, usage = os.wait4(child.pid, 0)
sys.stderr.write(f"\\n{time.perf_counter() - t} {usage.ru_maxrss} {os.waitstatus_to_exitcode(status)}\\n")
"""


# Every command runs as on a user's machine, where Python caches the modules it compiles (a pip install compiles
# them up front): PYTHONDONTWRITEBYTECODE, where set, would have merger's own sources (an editable install)
# compiled again in every run, about 0.1 s of start-up that no user sees, while mergekit's come precompiled.
_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def run_process(cmd: list[str], settle: float = 0.0) -> tuple[float, int, str]:
    """Wall seconds, peak RSS (bytes, from wait4) and stdout of a child process, started `settle` seconds
    from now (see --settle)."""
    time.sleep(settle)
    proc = subprocess.run([sys.executable, "-c", _TIMER, *cmd], capture_output=True, text=True, env=_ENV)
    err, _, last = proc.stderr.rstrip("\n").rpartition("\n")
    fields = last.split()
    if proc.returncode or len(fields) != 3 or fields[2] != "0":  # the command failed, or never started
        raise RuntimeError(f"{' '.join(cmd[:3])} failed:\n{proc.stderr[-2000:]}")
    return float(fields[0]), int(fields[1]) * 1024, proc.stdout


Best = dict[tuple[str, str, str], tuple[float, float, int]]  # (tool, method, device): wall s, merge s, runs


def fastest(rows: list[tuple]) -> Best:
    """Each tool's fastest wall and merge s per method and device, and how many runs they are the best of."""
    best: Best = {}
    for tool, method, device, wall, inner, *_ in rows:
        w, i, n = best.get((tool, method, device), (wall, inner, 0))
        best[tool, method, device] = (min(w, wall), min(i, inner), n + 1)
    return best


Paired = dict[tuple[str, str], list[float]]  # (method, device): a ratio per round


def print_best(best: Best, io: Paired, durable: Paired) -> None:
    """Each method's fastest runs, per tool and device: what the code can do, with the runs' noise left out;
    x I/O and x dur: the medians of its ratios to the limits of the same round."""
    print(f"\nbest of each: {'method':16} {'merge s':>8} {'runs':>4} {'x I/O':>6} {'x dur':>6} {'x TIES':>6} "
          f"{'wall s':>7} {'mk wall':>8} {'vs mk':>6} device")  # fmt: skip
    for (tool, method, device), (wall, inner, runs) in best.items():
        if tool != "merger":
            continue
        ties = best.get(("merger", "ties", device))
        mk = best.get(("mergekit", method, device))
        x_ties = f"{inner / ties[1]:6.2f}" if ties else "     -"
        mk_s = f"{mk[0]:8.2f} {mk[0] / wall:5.1f}x" if mk else "       -      -"
        x_io, x_dur = (float(np.median(p[method, device])) for p in (io, durable))
        print(f"{'':13} {method:16} {inner:8.2f} {runs:4} {x_io:6.2f} {x_dur:6.2f} "
              f"{x_ties} {wall:7.2f} {mk_s} {device}")  # fmt: skip


IO, DURABLE = "I/O limit", "+ flushed"  # the limit's rows: read + write, and read + write + fdatasync


def paired_ratios(rows: list[tuple], reference: str) -> Paired:
    """Each merger run's merge s over that of the run it pairs with in the same round, per (method, device):
    reference "ties", merger's TIES run on the same device; IO or DURABLE, the method's I/O limit. Runs
    minutes apart see the VM in different states, adjacent ones nearly the same."""
    inner = {(r[0], r[1], r[2], r[7]): r[4] for r in rows}
    ratios: Paired = {}
    for tool, method, device, _wall, merge_s, _rss, _gpu, rnd in rows:
        key = ("merger", "ties", device, rnd) if reference == "ties" else (reference, method, "-", rnd)
        if tool == "merger" and key in inner:
            ratios.setdefault((method, device), []).append(merge_s / inner[key])
    return ratios


def print_paired(ratios: Paired, what: str) -> None:
    shown = {key: rs for key, rs in ratios.items() if key[0] != "ties" or what != "TIES"}
    if shown:
        print(f"\npaired with {what} (merge s over its in the same round): median, then each round's")
    for (method, device), rs in shown.items():
        print(f"{'':13} {method:16} {float(np.median(rs)):6.2f}   {' '.join(f'{r:.2f}' for r in rs)}  {device}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tinyllama")
    ap.add_argument("--finetunes", type=int, default=2, help="fine-tunes besides the base (default 2: three models)")
    ap.add_argument("--methods", default="linear,task_arithmetic,ties")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--devices", help="devices to alternate within each repeat, e.g. cuda,cpu (instead of --device)")
    ap.add_argument("--repeat", type=int, default=2, help="rounds: each runs every method once, in order")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument(
        "--settle",
        type=float,
        default=3.0,
        help="seconds to wait before each timed run (default 3): the memory the previous run's deleted output "
        "freed is then handed back to the host where the VM reports free pages (Linux's free page reporting, "
        "2 s after a free), so each run writes into page cache as a merge into a new directory does, not into "
        "memory freed a moment ago (~5x faster to write on such a VM)",
    )
    ap.add_argument("--dir", type=Path, default=Path(os.environ.get("MERGER_BENCH_DIR", "/tmp/merger-bench")))
    ap.add_argument("--no-mergekit", action="store_true", help="skip mergekit even if installed")
    ap.add_argument("--mergekit-bin", help="the mergekit-yaml to run (default: the one on PATH)")
    ap.add_argument(
        "--rehash",
        action="store_true",
        help="also time `merger apply --rehash` (every input read again for the lock's hashes) beside each merger run",
    )
    args = ap.parse_args()
    devices = args.devices.split(",") if args.devices else [args.device]
    if any(d not in ("cpu", "cuda") for d in devices):
        ap.error(f"--devices: cpu, cuda or both, comma-separated (got {args.devices})")

    dirs = generate(args.dir, args.shape, args.finetunes, 2 << 30)
    in_bytes = sum(f.stat().st_size for f in dirs[0].glob("*.safetensors"))
    scratch = Path(tempfile.mkdtemp(dir=args.dir, prefix="run-"))
    mergekit = None if args.no_mergekit else (args.mergekit_bin or shutil.which("mergekit-yaml"))
    try:
        print(
            f"\n{args.shape}: {len(dirs)} models x {in_bytes / 1e9:.2f} GB bf16; "
            f"{os.cpu_count()} cores, device {','.join(devices)}",
            flush=True,
        )
        methods = args.methods.split(",")
        setups = {method: setup(method, dirs, in_bytes, scratch, devices, args) for method in methods}
        rows = []
        for rnd in range(args.repeat):  # every method once a round: a method's runs spread over the whole run
            for method in methods:
                rows += timed_runs(method, setups[method], devices, mergekit, rnd, args.settle)
        report(rows, dirs, in_bytes)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


class Setup(NamedTuple):
    """A method's commands (per device: tool -> command), its recipe and output paths, and its I/O limit's."""

    cmds: dict[str, dict[str, list[str]]]
    cfg: Path
    out: Path
    limit: list[str]  # io_stream.py's command: the method's inputs, one output


def setup(method: str, dirs: list[Path], in_bytes: int, scratch: Path, devices: list[str], args) -> Setup:
    """The method's recipe and commands, after one untimed merger run each (numba compiles its kernels on a
    machine's first merge, and the inputs' hashes are remembered, as in any rerun unless --rehash)."""
    cfg = scratch / f"{method}.yaml"
    out = scratch / "out"
    cfg.write_text(recipe(method, dirs, out))
    cmds = {}
    for device in devices:
        cmd = [sys.executable, "-m", "merger.cli", "apply", str(cfg), "-o", str(out), "--force", "--json",
               "--device", device]  # fmt: skip
        if args.workers > 1:
            cmd += ["--workers", str(args.workers)]
        cmds[device] = {"merger": cmd} | ({"merger --rehash": [*cmd, "--rehash"]} if args.rehash else {})
        run_process(cmd)  # warm-up, not timed
        shutil.rmtree(out, ignore_errors=True)
    # linear reads every model; task vector methods read the base and the fine-tunes; pairs two
    limit = [sys.executable, str(Path(__file__).with_name("io_stream.py")), str(scratch / "io-limit.bin")]
    return Setup(cmds, cfg, out, limit + [str(d) for d in read_by(method, dirs)])


def timed_runs(method: str, run: Setup, devices: list[str], mergekit: str | None, rnd: int, settle: float) -> list:
    """One round's runs of a method: its I/O limit, then each device's merger commands, then mergekit on that
    device (alternating: each sees the same conditions). Rows: tool, method, device, wall s, merge s (for the
    limit: read + write, and with the flush), peak RSS, peak GPU bytes, round."""
    out = run.out
    wall, rss, stdout = run_process(run.limit, settle)
    spent = json.loads(stdout)
    io = spent["read"] + spent["write"]
    rows = [
        (IO, method, "-", wall, io, rss, None, rnd),
        (DURABLE, method, "-", wall, io + spent["sync"], rss, None, rnd),
    ]
    for device in devices:
        for tool, cmd in run.cmds[device].items():
            wall, rss, stdout = run_process(cmd, settle)
            summary = json.loads(stdout)
            rows.append((tool, method, device, wall, summary["seconds"],
                         max(rss, summary["peak_rss_bytes"]), summary.get("peak_gpu_bytes"), rnd))  # fmt: skip
            shutil.rmtree(out, ignore_errors=True)
        if mergekit and method not in MERGEKIT_LACKS:
            mk = [mergekit, str(run.cfg), str(out), "--copy-tokenizer", "--lazy-unpickle"]
            if device == "cuda":
                mk.append("--cuda")
            wall, rss, _ = run_process(mk, settle)
            rows.append(("mergekit", method, device, wall, wall, rss, None, rnd))
            shutil.rmtree(out, ignore_errors=True)
    return rows


def report(rows: list, dirs: list[Path], in_bytes: int) -> None:
    """Every run, then the best of each, then the ratios to the I/O limit and to TIES paired by round."""
    print(f"\n{'tool':15} {'method':16} {'wall s':>7} {'merge s':>8} {'GB/s':>6} {'x I/O':>6} {'x dur':>6} {'vs mk':>6} "
          f"{'peak RSS':>9} {'peak GPU':>9} device")  # fmt: skip
    best = fastest(rows)
    limits = {(r[0], r[1], r[7]): r[4] for r in rows if r[0] in (IO, DURABLE)}
    for tool, method, device, wall, inner, rss, gpu, rnd in rows:
        mk = best.get(("mergekit", method, device))
        vs = f"{mk[0] / wall:5.1f}x" if mk and tool != "mergekit" else "     -"
        gbps = len(read_by(method, dirs)) * in_bytes / inner / 1e9
        gpu_s = f"{gpu / 1e9:7.2f}GB" if gpu else "        -"
        print(f"{tool:15} {method:16} {wall:7.2f} {inner:8.2f} {gbps:6.2f} {inner / limits[IO, method, rnd]:6.2f} "
              f"{inner / limits[DURABLE, method, rnd]:6.2f} {vs:>6} "
              f"{rss / 1e9:7.2f}GB {gpu_s} {device}")  # fmt: skip
    io, durable = paired_ratios(rows, IO), paired_ratios(rows, DURABLE)
    print_best(best, io, durable)
    print_paired(io, "the I/O limit")
    print_paired(durable, "the flushed I/O limit")
    print_paired(paired_ratios(rows, "ties"), "TIES")
    print(
        "\nwall s: the whole process (Python start-up and imports included); merge s: merger's own timer "
        "(read, merge, write, hash the inputs for the lock (unless remembered from the warm-up run: --rehash "
        "reads them again), flush to disk, rename); for the I/O limit, read + write, and (+ flushed) with the "
        "fdatasync. x I/O: merge s / the round's (read + write) limit; x dur: merge s / the round's limit "
        "flushed to disk, as merger's output is (best of each: the medians of those). "
        "GB/s: input bytes / merge s; vs mk: against mergekit's best wall on the same device. "
        "best: the fastest of each tool's runs (this VM's runs swing with the state of its memory, "
        "not with the code), x TIES: against TIES' best merge s, vs mk: merger's best wall against mergekit's. "
        "paired: the rounds run every method in turn, so a method's ratio to TIES in one round compares runs "
        "seconds apart."
    )


if __name__ == "__main__":
    main()
