"""The one command to run on a lent GPU machine (`make gpu`): CUDA tests, torch's CUDA sanitizer, CUDA against
CPU byte for byte at TinyLlama shape, then the benchmark on both devices. Stops at the first step that fails.

    python benchmarks/gpu_check.py                         # what `make gpu` runs; ~8 min on one H200 machine (estimated)
    python benchmarks/gpu_check.py --shape 3b              # compare and bench at a 3B shape: ~20 min (estimated)
    python benchmarks/gpu_check.py --steps compare --shape tiny --devices cpu,cpu   # a self-test on a CPU
    PYTHONPATH=. python3 benchmarks/gpu_check.py   # offline, with a python3 that has CUDA torch and merger's needs

Steps (--steps picks some, in this order):
  tests      pytest -q -rs -m cuda on the test modules that hold a test marked `cuda` (test_gpu.py and others),
             in --test-workers processes where pytest-xdist is installed.
  sanitizer  a small TIES merge on --devices' first device under torch's CUDA stream sanitizer
             (TORCH_CUDA_SANITIZER=1) with MERGER_INLINE_STAGING=1, once as planned and once with every
             tensor merged in pieces; fails if the sanitizer reports a data race. CSAN watches only the
             thread that enabled it, hence staging inline rather than on the stager thread.
  compare    a bf16 merge of --shape (bench_merge.py's synthetic checkpoints and recipes) on each of --devices
             for each of --compare-methods (TIES and the two that draw, by default: their draws must not
             depend on the device), the outputs compared byte for byte, every file, shard and tensor (NaN
             payloads included).
  bench      bench_merge.py at --shape, alternating --devices within each repeat.

Everything printed also goes to --report (default gpu-report.txt): send that file back.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_merge  # noqa: E402  (the synthetic checkpoints and their recipes)

STEPS = ("tests", "sanitizer", "compare", "bench")
NO_CUDA = "torch sees no CUDA device. On an NVIDIA machine, install a CUDA build of torch: rm -rf .venv && make setup TORCH=torch"


class StepFailed(Exception):
    """A step's verdict: the check stops here, with this message."""


class Report:
    """Lines to the terminal and to the report file at once."""

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "w", encoding="utf-8")
        self.warnings: list[str] = []  # repeated at the end

    def warn(self, text: str) -> None:
        self.warnings.append(text)
        self.line("WARNING: " + text)

    def write(self, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()
        self.file.write(text)
        self.file.flush()

    def flush(self) -> None:
        pass

    def line(self, text: str = "") -> None:
        self.write(text + "\n")

    def run(self, cmd: list[str], env: dict[str, str] | None = None) -> tuple[int, str]:
        """Run cmd from the repository root, its output (stdout and stderr, interleaved) shown and recorded as
        it comes. Returns the exit code and the output."""
        shown = [arg if "\n" not in arg else "<script>" for arg in cmd]  # python -c's code: not worth a page
        self.line("$ " + " ".join(shown))
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
        )  # fmt: skip
        lines = []
        for line in proc.stdout:
            lines.append(line)
            self.write(line)
        return proc.wait(), "".join(lines)


# ---- comparing two outputs --------------------------------------------------------------------------------

# safetensors dtype: the unsigned integer of its width, to compare entries bit for bit
_BITS = {"F64": np.uint64, "F32": np.uint32, "F16": np.uint16, "BF16": np.uint16, "I64": np.uint64,
         "I32": np.uint32, "I16": np.uint16, "I8": np.uint8, "U8": np.uint8, "BOOL": np.uint8,
         "F8_E4M3": np.uint8, "F8_E5M2": np.uint8, "U16": np.uint16, "U32": np.uint32, "U64": np.uint64}  # fmt: skip
_SIGNED = {"I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8}


@dataclass
class Difference:
    """Where two outputs differ: a whole file (tensor None) or one tensor's bytes."""

    file: str
    tensor: str | None = None
    what: str = ""  # for a file: how it differs
    dtype: str = ""
    shape: tuple[int, ...] = ()
    differing: int = 0  # entries whose bytes differ
    max_abs_diff: float = 0.0  # over differing entries where both sides are numbers (inf where one is inf)
    nan_mismatches: int = 0  # differing entries where at least one side is NaN (payloads included)
    first: int = 0  # flat index of the first differing entry
    first_values: tuple[float, float] = (0.0, 0.0)

    def describe(self) -> str:
        if self.tensor is None:
            return f"{self.file}: {self.what}"
        numel = int(np.prod(self.shape, dtype=np.int64))
        text = (
            f"{self.file}: tensor '{self.tensor}' {self.dtype} {list(self.shape)}: {self.differing} of {numel} "
            f"entries differ, max abs diff {self.max_abs_diff:.6g}"
        )
        if self.nan_mismatches:
            text += f", {self.nan_mismatches} of them with a NaN on one side or both (bits differ)"
        a, b = self.first_values
        return text + f"; first at flat index {self.first}: {a!r} vs {b!r}"


def _header(path: Path) -> tuple[dict, int]:
    """A safetensors file's header and where its data starts."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n)), 8 + n


def _same_bytes(a: Path, b: Path, block: int = 64 << 20) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(block), fb.read(block)
            if x != y:
                return False
            if not x:
                return True


def _as_numbers(bits: np.ndarray, dtype: str) -> np.ndarray:
    """Entries (raw bits, unsigned) as float64, for the size of a difference."""
    if dtype == "BF16":
        return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    if dtype in ("F16", "F32", "F64"):
        return bits.view({"F16": np.float16, "F32": np.float32, "F64": np.float64}[dtype]).astype(np.float64)
    if dtype in _SIGNED:
        return bits.view(_SIGNED[dtype]).astype(np.float64)
    if dtype in ("F8_E4M3", "F8_E5M2"):  # no numpy float8
        import torch

        f8 = torch.float8_e4m3fn if dtype == "F8_E4M3" else torch.float8_e5m2
        return torch.from_numpy(bits).view(f8).double().numpy()
    return bits.astype(np.float64)


def _tensor_difference(file: str, name: str, info: dict, a: np.ndarray, b: np.ndarray) -> Difference | None:
    """Compare one tensor's bytes (a, b: uint8 views of its data in each file)."""
    if np.array_equal(a, b):
        return None
    bits = _BITS.get(info["dtype"], np.uint8)
    x, y = a.view(bits), b.view(bits)
    where = np.flatnonzero(x != y)  # (differing,)
    nx, ny = _as_numbers(x[where], info["dtype"]), _as_numbers(y[where], info["dtype"])
    nan = np.isnan(nx) | np.isnan(ny)
    with np.errstate(invalid="ignore"):
        gaps = np.abs(nx[~nan] - ny[~nan])
    return Difference(
        file, name, dtype=info["dtype"], shape=tuple(info["shape"]), differing=int(where.size),
        max_abs_diff=float(gaps.max()) if gaps.size else float("nan"), nan_mismatches=int(nan.sum()),
        first=int(where[0]), first_values=(float(nx[0]), float(ny[0])),
    )  # fmt: skip


def compare_outputs(a: Path, b: Path) -> list[Difference]:
    """Every way output directory b differs from a, byte for byte: files only one side has, files whose bytes
    differ (for safetensors shards: their headers, then each tensor whose bytes differ, in file order)."""
    diffs = []
    files_a = {p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file()}
    files_b = {p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file()}
    diffs += [Difference(f, what=f"only in {a}") for f in sorted(files_a - files_b)]
    diffs += [Difference(f, what=f"only in {b}") for f in sorted(files_b - files_a)]
    for f in sorted(files_a & files_b):
        pa, pb = a / f, b / f
        if _same_bytes(pa, pb):
            continue
        if not f.endswith(".safetensors"):
            diffs.append(Difference(f, what="the bytes differ"))
            continue
        (ha, start_a), (hb, start_b) = _header(pa), _header(pb)
        if ha != hb:
            names = sorted(set(ha) ^ set(hb)) or sorted(k for k in ha if ha[k] != hb.get(k))
            diffs.append(Difference(f, what=f"the headers differ (first at {names[:3]})"))
            continue
        if start_a != start_b:
            diffs.append(Difference(f, what="the headers hold the same entries in different bytes"))
        da, db = np.memmap(pa, np.uint8, mode="r"), np.memmap(pb, np.uint8, mode="r")
        found = 0
        tensors = sorted((k for k in ha if k != "__metadata__"), key=lambda k: ha[k]["data_offsets"][0])
        for name in tensors:
            s, e = ha[name]["data_offsets"]
            d = _tensor_difference(f, name, ha[name], da[start_a + s : start_a + e], db[start_b + s : start_b + e])
            if d is not None:
                diffs.append(d)
                found += 1
        if not found:
            diffs.append(Difference(f, what="the bytes differ outside every tensor (header or padding)"))
        del da, db
    return diffs


# ---- the steps --------------------------------------------------------------------------------------------

ENVIRONMENT = r"""
import importlib.metadata as md, os, platform, sys, torch
print(f"python {platform.python_version()} on {platform.platform()}")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
def version(p):
    try:
        return md.version(p)
    except md.PackageNotFoundError:  # merger run from the checkout (PYTHONPATH), or a package missing
        return "not installed"
print(", ".join(f"{p} {version(p)}" for p in ("numpy", "numba", "safetensors", "pytest-xdist", "merger")))
print(f"{os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable)")
env = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith(("CUDA_", "MERGER_", "TORCH_"))]
print("; ".join(env) or "no CUDA_*, MERGER_* or TORCH_* variables set")
if not torch.cuda.is_available():
    print("torch.cuda.is_available(): False")
    sys.exit(3)
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"GPU {i}: {p.name}, {p.total_memory / 2**30:.1f} GiB, compute capability {p.major}.{p.minor}, "
          f"{p.multi_processor_count} SMs")
"""


def environment(report: Report, args: argparse.Namespace, cuda: bool) -> None:
    """The machine, the versions and the checkout the figures come from."""
    report.line(
        f"started {time.strftime('%Y-%m-%d %H:%M:%S %z')}; " + " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
    )
    for cmd in (["git", "rev-parse", "HEAD"], ["git", "status", "--short", "--untracked-files=no"]):
        with contextlib.suppress(OSError):
            report.run(cmd)
    if shutil.which("nvidia-smi"):
        report.run(["nvidia-smi"])
    else:
        report.line("nvidia-smi: not found")
    meminfo = Path("/proc/meminfo").read_text().splitlines()[:3] if Path("/proc/meminfo").exists() else []
    report.line("; ".join(" ".join(line.split()) for line in meminfo))
    args.dir.mkdir(parents=True, exist_ok=True)
    report.line(f"{args.dir}: {shutil.disk_usage(args.dir).free / 1e9:.1f} GB free")
    rc, _ = report.run([sys.executable, "-c", ENVIRONMENT])
    if rc == 3 and cuda:
        raise StepFailed(NO_CUDA)
    if rc not in (0, 3):
        raise StepFailed("could not import torch (see above)")


def cuda_test_files(tests: Path = ROOT / "tests") -> list[str]:
    """The test modules that hold a test marked `cuda`: pytest then imports those alone (the others' imports
    and fixtures cost device time and may need packages a bare GPU machine lacks)."""
    return sorted(str(f) for f in tests.glob("test_*.py") if re.search(r"\bpytest\.mark\.cuda\b", f.read_text()))


def run_tests(report: Report, args: argparse.Namespace) -> None:
    files = cuda_test_files()
    if not files:
        raise StepFailed("no test marked cuda under tests/")
    workers = ["-n", str(args.test_workers)] if args.test_workers > 1 and _has_xdist() else []
    rc, _ = report.run([sys.executable, "-m", "pytest", "-q", "-rs", "-m", "cuda", *workers, *files])
    if rc:
        raise StepFailed(f"the CUDA tests failed (pytest exit code {rc})")


def _has_xdist() -> bool:
    """Whether pytest-xdist is there to spread the CUDA tests over processes (they share the GPU)."""
    return importlib.util.find_spec("xdist") is not None


# The sanitizer's merge, run as `python -c SANITIZED MODE merger-apply-arguments...`. It notes which
# threads start (a stager thread means staging was not inline: CSAN saw none of its uploads), and in MODE
# "pieces" has every tensor merged in pieces of 4096 entries, as tests/test_gpu.py does.
SANITIZED = r"""
import sys, threading
started = set()
_start = threading.Thread.start
def start(self):
    started.add(self.name.rsplit("_", 1)[0])
    _start(self)
threading.Thread.start = start
import torch  # with TORCH_CUDA_SANITIZER set, this enables the sanitizer on this thread
import merger.budget, merger.plan
from merger.cli import cli
if sys.argv[1] == "pieces":
    if not (hasattr(merger.budget, "gpu_budget") and hasattr(merger.plan.Plan, "gpu_piece")):
        sys.exit("cannot force pieces: merger.budget.gpu_budget or Plan.gpu_piece is gone; update gpu_check.py")
    merger.budget.gpu_budget = lambda: 1
    merger.plan.Plan.gpu_piece = lambda self, t, gpu: 4096
try:
    cli.main(sys.argv[2:], prog_name="merger")
finally:
    print("threads started: " + ", ".join(sorted(started)), file=sys.stderr)
"""
RACE = "CSAN detected a possible data race"


def sanitizer_verdict(rc: int, output: str) -> None:
    """Raise StepFailed if the sanitized merge failed or CSAN reported a race."""
    if RACE in output:
        raise StepFailed(f"torch's CUDA sanitizer reported {output.count(RACE)} possible data race(s) (see above)")
    if rc:
        raise StepFailed(f"the sanitized merge failed (exit code {rc}; see above)")


def run_sanitizer(report: Report, args: argparse.Namespace) -> None:
    device = args.devices[0]
    dirs = generate(report, args.dir, "tiny")
    scratch = fresh(args.dir / "gpu-check-sanitizer")
    recipe = scratch / "ties.yaml"
    recipe.write_text(bench_merge.recipe("ties", dirs, scratch / "out"))
    env = {"MERGER_INLINE_STAGING": "1"}
    if device == "cuda":
        env["TORCH_CUDA_SANITIZER"] = "1"
    else:
        report.line(f"(--devices {device}: the sanitizer needs CUDA; this runs the same merges without it)")
    for mode in ("whole", "pieces"):
        out = scratch / f"out-{mode}"
        cmd = [sys.executable, "-c", SANITIZED, mode, "apply", str(recipe), "-o", str(out), "--device", device,
               "--shard-size", "100KB", "--force", "-q"]  # fmt: skip
        rc, output = report.run(cmd, env)
        sanitizer_verdict(rc, output)
        if "merger-stager" in output.rpartition("threads started:")[2].splitlines()[0]:
            report.warn(
                f"sanitizer ({mode}): the engine staged on its stager thread although MERGER_INLINE_STAGING=1, so "
                "the sanitizer saw none of the uploads, only the merges"
            )
        report.line(f"sanitized merge ({mode}): no race reported")
    shutil.rmtree(scratch)


def run_compare(report: Report, args: argparse.Namespace) -> None:
    dirs = generate(report, args.dir, args.shape)
    for method in args.compare_methods:
        compare_method(report, args, dirs, method)


def compare_method(report: Report, args: argparse.Namespace, dirs: list[Path], method: str) -> None:
    """One bf16 merge of `method` on each of --devices, the outputs compared byte for byte."""
    scratch = fresh(args.dir / f"gpu-check-{args.shape}")
    recipe = scratch / f"{method}.yaml"
    recipe.write_text(bench_merge.recipe(method, dirs, scratch / "out"))
    shard_size = str(max(1, model_bytes(args.shape) // 3))  # a few shards, whatever the shape
    outs = []
    for i, device in enumerate(args.devices):
        out = scratch / f"{i + 1}-{device}" / "merged"  # one name: the model card holds it
        t = time.perf_counter()
        rc, _ = report.run([sys.executable, "-m", "merger.cli", "apply", str(recipe), "-o", str(out), "--device",
                            device, "--shard-size", shard_size, "--force", "-q"])  # fmt: skip
        if rc:
            raise StepFailed(f"the {args.shape} {method} merge on {device} failed (exit code {rc}; see above)")
        report.line(f"{method}: merged on {device} in {time.perf_counter() - t:.1f} s (wall, start-up included)")
        outs.append(out)
    diffs = compare_outputs(*outs)
    if diffs:
        tensors = [d for d in diffs if d.tensor is not None]
        report.line(f"\nthe {method} outputs differ: {len(diffs)} difference(s), {len(tensors)} of them in tensors")
        for d in diffs[:20]:
            report.line("  " + d.describe())
        if len(diffs) > 20:
            report.line(f"  ... and {len(diffs) - 20} more")
        report.line(f"(the outputs are kept in {scratch})")
        raise StepFailed(
            f"the {args.shape} {method} merges on {' and '.join(args.devices)} differ; first: {diffs[0].describe()}"
        )
    n_files = len([p for p in outs[0].rglob("*") if p.is_file()])
    report.line(f"{method}: the outputs on {' and '.join(args.devices)} are identical, byte for byte ({n_files} files)")
    shutil.rmtree(scratch)


def run_bench(report: Report, args: argparse.Namespace) -> None:
    cmd = [sys.executable, "benchmarks/bench_merge.py", "--shape", args.shape, "--devices", ",".join(args.devices),
           "--repeat", str(args.repeat), "--dir", str(args.dir)]  # fmt: skip
    rc, _ = report.run(cmd)
    if rc:
        raise StepFailed(f"the benchmark failed (exit code {rc}; see above)")


def generate(report: Report, root: Path, shape: str) -> list[Path]:
    """bench_merge's synthetic base and two fine-tunes at `shape` (generated once, then reused)."""
    with contextlib.redirect_stderr(report):
        return bench_merge.generate(root, shape, 2, 2 << 30)


def model_bytes(shape: str) -> int:
    return sum(2 * int(np.prod(s)) for _, s in bench_merge.llama_tensors(shape))


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def main(argv: list[str] | None = None) -> int:
    first, _, rest = __doc__.partition("\n\n")
    ap = argparse.ArgumentParser(
        description=" ".join(first.split()), epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--steps", default=",".join(STEPS), help=f"some of {','.join(STEPS)} (default: all)")
    ap.add_argument("--devices", default="cuda,cpu", help="the two devices compared and benchmarked (default cuda,cpu)")
    ap.add_argument(
        "--shape",
        default="tinyllama",
        choices=sorted(bench_merge.SHAPES),
        help="compare and bench (default tinyllama)",
    )
    ap.add_argument("--compare-methods", default="ties,dare_ties,della",
                    help="the methods the compare step merges on both devices (default ties,dare_ties,della); not "
                         "tsv, iso_c or iso_cts, whose SVDs agree across devices to rounding, not bit for bit")  # fmt: skip
    ap.add_argument(
        "--test-workers",
        type=int,
        default=min(8, max(1, (os.cpu_count() or 2) // 2)),
        help="pytest-xdist processes for the CUDA tests, where it is installed (default: half the cores, at most 8; "
        "1: one process)",
    )
    ap.add_argument("--repeat", type=int, default=2, help="benchmark runs per device and method (default 2)")
    ap.add_argument("--dir", type=Path, default=Path(os.environ.get("MERGER_BENCH_DIR", "/tmp/merger-bench")),
                    help="checkpoints and scratch outputs (default $MERGER_BENCH_DIR or /tmp/merger-bench)")  # fmt: skip
    ap.add_argument("--report", type=Path, default=ROOT / "gpu-report.txt", help="default gpu-report.txt")
    args = ap.parse_args(argv)
    steps = args.steps.split(",")
    args.devices = args.devices.split(",")
    args.compare_methods = args.compare_methods.split(",")
    if unknown := [m for m in args.compare_methods if m not in bench_merge.RECIPES]:
        ap.error(f"--compare-methods: unknown {unknown}; choose from {','.join(bench_merge.RECIPES)}")
    if unknown := [s for s in steps if s not in STEPS]:
        ap.error(f"--steps: unknown {unknown}; choose from {','.join(STEPS)}")
    if len(args.devices) != 2 or any(d not in ("cpu", "cuda") for d in args.devices):
        ap.error(f"--devices: two of cpu, cuda, e.g. cuda,cpu (got {','.join(args.devices)})")
    cuda = "tests" in steps or "cuda" in args.devices
    # inputs (base, two fine-tunes) and, at most, two outputs of the compare step or one output and the
    # I/O limit's file of the benchmark
    need = 5 * model_bytes(args.shape) if {"compare", "bench"} & set(steps) else 0

    report = Report(args.report.resolve())
    plan = [s for s in STEPS if s in steps]
    current, done = "environment", []
    began = time.perf_counter()
    try:
        report.line("== environment ==")
        environment(report, args, cuda)
        check_disk(args.dir, args.shape, need)
        for i, current in enumerate(plan):
            report.line(f"\n== step {i + 1}/{len(plan)}: {current} ({time.strftime('%H:%M:%S')}) ==")
            t = time.perf_counter()
            {"tests": run_tests, "sanitizer": run_sanitizer, "compare": run_compare, "bench": run_bench}[current](
                report, args
            )
            done.append(f"{current} {time.perf_counter() - t:.0f} s")
            report.line(f"step {current}: passed")
    except StepFailed as e:
        verdict, rc = f"gpu check FAILED at {current}: {e}", 1
    except Exception:  # a bug here, or the machine's (a full disk): the traceback belongs in the report too
        report.write(traceback.format_exc())
        verdict, rc = f"gpu check FAILED at {current}: an unexpected error (traceback above)", 1
    else:
        verdict, rc = f"gpu check passed: {', '.join(done)}; {time.perf_counter() - began:.0f} s in all", 0
    report.line()
    for w in report.warnings:
        report.line("WARNING: " + w)
    report.line(verdict)
    report.line(f"Send back {report.path} (the whole file).")
    return rc


def check_disk(root: Path, shape: str, need: int) -> None:
    """Fail before generating anything if the checkpoints and outputs cannot fit under root."""
    have = shutil.disk_usage(root).free
    if (root / shape).exists():  # checkpoints generated earlier are reused
        have += sum(f.stat().st_size for f in (root / shape).rglob("*.safetensors"))
    if have < need * 1.05:
        raise StepFailed(
            f"{root} has {have / 1e9:.0f} GB for the checkpoints and outputs; the {shape} steps need about "
            f"{need / 1e9:.0f} GB: free some, or point --dir (or MERGER_BENCH_DIR) elsewhere"
        )


if __name__ == "__main__":
    sys.exit(main())
