"""Benchmark merger (and mergekit, when installed) against the I/O limit on synthetic checkpoints of real shapes.

    python benchmarks/bench_merge.py --shape tinyllama            # 3 x 2.2 GB bf16 inputs, CPU
    python benchmarks/bench_merge.py --shape llama2-7b --device cuda
    python benchmarks/bench_merge.py --shape small --repeat 1     # a quick smoke run (~30 MB)
    python benchmarks/bench_merge.py --shape 3b --devices cuda,cpu   # GPU and CPU runs alternating

mergekit is optional: install it in its own environment (`python -m venv /tmp/mk && /tmp/mk/bin/pip install
torch==2.13.0 mergekit`) and pass `--mergekit-bin /tmp/mk/bin/mergekit-yaml`, or have mergekit-yaml on PATH.

Checkpoints (a base and N fine-tunes, bf16, sharded, with a real Llama config) are generated once
into --dir and reused. Each method first gets one untimed merger run (numba compiles its kernels on
a machine's first merge and caches them; this also warms the page cache), then the I/O limit is
measured on those files: read every input once (page cache warm, as the merges see it; the faster of
read(2) and a mapping) plus write one output of the merged size (the faster of two writers). Then come
--repeat rounds, each running every method once in turn (merger, then mergekit on the same recipe), each
as its own process; peak RSS is the process's high-water mark. The table lists every run, then the best
of each tool's runs per method, then (with ties among the methods) each method's merge s over TIES' in
the same round: this VM's speed drifts over minutes, so runs seconds apart compare best.
"""

from __future__ import annotations

import argparse
import json
import mmap
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


def io_limit(inputs: list[Path], out_bytes: int, scratch: Path) -> tuple[dict[str, float], dict[str, float]]:
    """Seconds to read every input file once, two ways: `read(2)` into a 1 MiB buffer, and mapping each
    file and loading every 64-byte line of it (how merger reads); and to write out_bytes: plain
    `write(2)` of a 1 MiB block, and through merger's ShardWriter writing past the page cache as it does
    with stream.drop_behind (O_DIRECT where the file system allows), each without and with fdatasync.
    The faster read and the faster write make the limit."""
    from merger.plan import OutTensor
    from merger.stream import ShardWriter, direct_stage

    buf = bytearray(1 << 20)  # cache-resident, as dd's blocks: the copy out of the page cache is all it costs
    mv = memoryview(buf)
    files = [f for d in inputs for f in sorted(d.glob("*.safetensors"))]

    def read_syscall(f: Path) -> None:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(mv):
                pass

    def read_mapped(f: Path) -> None:
        with open(f, "rb") as fh:
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        words = np.frombuffer(mm, np.uint64, count=mm.size() // 8)
        for s in range(0, words.size, 1 << 20):
            words[s : s + (1 << 20) : 8].max()  # one load per 64-byte line: every line comes from memory
        del words
        mm.madvise(mmap.MADV_DONTNEED)  # unmapped as merger's reader does when a tensor is done
        mm.close()

    for f in files:  # warm the page cache, as the merges will find it
        read_syscall(f)
    reads = {}
    for how, read in (("read", read_syscall), ("mmap", read_mapped)):
        t = time.perf_counter()
        for f in files:
            read(f)
        reads[how] = time.perf_counter() - t
    target = scratch / "io-limit.bin"
    whole = OutTensor("bytes", (out_bytes,), "U8", True, out_bytes)
    block = np.frombuffer(buf, np.uint8)
    stage = direct_stage()  # as stream._Writer's
    writes = {}
    for how in ("plain", "writer", "plain+sync", "writer+sync"):
        t = time.perf_counter()
        if how.startswith("plain"):
            with open(target, "wb", buffering=0) as fh:
                left = out_bytes
                while left > 0:
                    left -= fh.write(mv[: min(left, len(buf))])
                if how.endswith("sync"):
                    os.fdatasync(fh.fileno())
        else:
            w = ShardWriter(target, [whole], drop_behind=True, stage=stage)
            for s in range(0, out_bytes, len(buf)):
                w.write(whole, block[: min(len(buf), out_bytes - s)])
            w.close()
            if how.endswith("sync"):
                fd = os.open(target, os.O_RDONLY)
                os.fdatasync(fd)  # any descriptor of the file will do
                os.close(fd)
        writes[how] = time.perf_counter() - t
        target.unlink()
    return reads, writes


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


def run_process(cmd: list[str]) -> tuple[float, int, str]:
    """Wall seconds, peak RSS (bytes, from wait4) and stdout of a child process."""
    proc = subprocess.run([sys.executable, "-c", _TIMER, *cmd], capture_output=True, text=True)
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


def print_best(best: Best, limits: dict[str, float], durable: dict[str, float]) -> None:
    """Each method's fastest runs, per tool and device: what the code can do, with the runs' noise left out."""
    print(f"\nbest of each: {'method':16} {'merge s':>8} {'runs':>4} {'x I/O':>6} {'x dur':>6} {'x TIES':>6} "
          f"{'wall s':>7} {'mk wall':>8} {'vs mk':>6} device")  # fmt: skip
    for (tool, method, device), (wall, inner, runs) in best.items():
        if tool != "merger":
            continue
        ties = best.get(("merger", "ties", device))
        mk = best.get(("mergekit", method, device))
        x_ties = f"{inner / ties[1]:6.2f}" if ties else "     -"
        mk_s = f"{mk[0]:8.2f} {mk[0] / wall:5.1f}x" if mk else "       -      -"
        print(f"{'':13} {method:16} {inner:8.2f} {runs:4} {inner / limits[method]:6.2f} {inner / durable[method]:6.2f} "
              f"{x_ties} {wall:7.2f} {mk_s} {device}")  # fmt: skip


def paired_ratios(rows: list[tuple]) -> dict[tuple[str, str], list[float]]:
    """Each merger method's merge s over TIES' in the same round, per (method, device): runs minutes apart
    see the VM in different states, adjacent ones nearly the same."""
    ties = {(r[2], r[7]): r[4] for r in rows if r[0] == "merger" and r[1] == "ties"}
    ratios: dict[tuple[str, str], list[float]] = {}
    for tool, method, device, _wall, inner, _rss, _gpu, rnd in rows:
        if tool == "merger" and (device, rnd) in ties:
            ratios.setdefault((method, device), []).append(inner / ties[device, rnd])
    return ratios


def print_paired(ratios: dict[tuple[str, str], list[float]]) -> None:
    if not any(method != "ties" for method, _ in ratios):
        return
    print("\npaired with TIES (merge s over TIES' in the same round): median, then each round's")
    for (method, device), rs in ratios.items():
        if method != "ties":
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
                rows += timed_runs(method, setups[method], devices, mergekit, rnd)
        limits = {m: s.limit for m, s in setups.items()}
        report(rows, dirs, in_bytes, limits, {m: s.durable for m, s in setups.items()})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


class Setup(NamedTuple):
    """A method's commands (per device: tool -> command), its recipe and output paths, and its I/O limits."""

    cmds: dict[str, dict[str, list[str]]]
    cfg: Path
    out: Path
    limit: float  # read + write
    durable: float  # read + a write flushed to disk


def setup(method: str, dirs: list[Path], in_bytes: int, scratch: Path, devices: list[str], args) -> Setup:
    """The method's recipe and commands, after one untimed merger run each (numba compiles its kernels on a
    machine's first merge, and the inputs' hashes are remembered, as in any rerun unless --rehash), and its
    I/O limits."""
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
    reads, writes = io_limit(read_by(method, dirs), in_bytes, scratch)
    read_s = min(reads.values())
    write_s = min(writes["plain"], writes["writer"])
    print(
        f"{method}: I/O limit read all inputs {read_s:.2f} s (read(2) {reads['read']:.2f} s, mapped "
        f"{reads['mmap']:.2f} s) + write one output {write_s:.2f} s (write(2) {writes['plain']:.2f} s, "
        f"merger's writer {writes['writer']:.2f} s; with fdatasync {writes['plain+sync']:.2f} / "
        f"{writes['writer+sync']:.2f} s)",
        flush=True,
    )
    return Setup(cmds, cfg, out, read_s + write_s, read_s + min(writes["plain+sync"], writes["writer+sync"]))


def timed_runs(method: str, run: Setup, devices: list[str], mergekit: str | None, rnd: int) -> list:
    """One round's runs of a method: each device's merger commands, then mergekit on that device
    (alternating: each sees the same conditions). Rows: tool, method, device, wall s, merge s, peak RSS,
    peak GPU bytes, round."""
    out = run.out
    rows = []
    for device in devices:
        for tool, cmd in run.cmds[device].items():
            wall, rss, stdout = run_process(cmd)
            summary = json.loads(stdout)
            rows.append((tool, method, device, wall, summary["seconds"],
                         max(rss, summary["peak_rss_bytes"]), summary.get("peak_gpu_bytes"), rnd))  # fmt: skip
            shutil.rmtree(out, ignore_errors=True)
        if mergekit and method not in MERGEKIT_LACKS:
            mk = [mergekit, str(run.cfg), str(out), "--copy-tokenizer", "--lazy-unpickle"]
            if device == "cuda":
                mk.append("--cuda")
            wall, rss, _ = run_process(mk)
            rows.append(("mergekit", method, device, wall, wall, rss, None, rnd))
            shutil.rmtree(out, ignore_errors=True)
    return rows


def report(rows: list, dirs: list[Path], in_bytes: int, limits: dict[str, float], durable: dict[str, float]) -> None:
    """Every run, then the best of each, then the ratios to TIES paired by round."""
    print(f"\n{'tool':15} {'method':16} {'wall s':>7} {'merge s':>8} {'GB/s':>6} {'x I/O':>6} {'x dur':>6} {'vs mk':>6} "
          f"{'peak RSS':>9} {'peak GPU':>9} device")  # fmt: skip
    best = fastest(rows)
    for tool, method, device, wall, inner, rss, gpu, _rnd in rows:
        mk = best.get(("mergekit", method, device))
        vs = f"{mk[0] / wall:5.1f}x" if mk and tool != "mergekit" else "     -"
        gbps = len(read_by(method, dirs)) * in_bytes / inner / 1e9
        gpu_s = f"{gpu / 1e9:7.2f}GB" if gpu else "        -"
        print(f"{tool:15} {method:16} {wall:7.2f} {inner:8.2f} {gbps:6.2f} {inner / limits[method]:6.2f} "
              f"{inner / durable[method]:6.2f} {vs:>6} "
              f"{rss / 1e9:7.2f}GB {gpu_s} {device}")  # fmt: skip
    print_best(best, limits, durable)
    print_paired(paired_ratios(rows))
    print(
        "\nwall s: the whole process (Python start-up and imports included); merge s: merger's own timer "
        "(read, merge, write, hash the inputs for the lock (unless remembered from the warm-up run: --rehash "
        "reads them again), flush to disk, rename). x I/O: merge s / (read + "
        "write) limit; x dur: merge s / (read + write flushed to disk) limit, as merger's output is. "
        "GB/s: input bytes / merge s; vs mk: against mergekit's best wall on the same device. "
        "best: the fastest of each tool's runs (this VM's runs swing with the state of its memory, "
        "not with the code), x TIES: against TIES' best merge s, vs mk: merger's best wall against mergekit's. "
        "paired: the rounds run every method in turn, so a method's ratio to TIES in one round compares runs "
        "seconds apart."
    )


if __name__ == "__main__":
    main()
