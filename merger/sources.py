"""Model references: where a checkpoint's safetensors live and which tensors they hold, from headers alone."""

from __future__ import annotations

import contextlib
import ctypes
import math
import mmap
import os
import shlex
import signal
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol

import numpy as np

from merger import system
from merger.errors import InputChanged, ModelError
from merger.files import Folder, check_name, parse_json, support_limit

if TYPE_CHECKING:
    import torch

# safetensors dtype code -> (torch's name for it, bytes per element, the numpy dtype of a zero-copy
# view). numpy has no bfloat16 or float8: those are viewed as integers of their size (bfloat16 as
# int16, float16 as uint16: the forms merger.kernels reads); torch_dtype()/to_torch() give the real type.
DTYPES: dict[str, tuple[str, int, type[np.generic]]] = {
    "F64": ("float64", 8, np.float64),
    "F32": ("float32", 4, np.float32),
    "F16": ("float16", 2, np.uint16),
    "BF16": ("bfloat16", 2, np.int16),
    "F8_E4M3": ("float8_e4m3fn", 1, np.uint8),
    "F8_E5M2": ("float8_e5m2", 1, np.uint8),
    "I64": ("int64", 8, np.int64),
    "I32": ("int32", 4, np.int32),
    "I16": ("int16", 2, np.int16),
    "I8": ("int8", 1, np.int8),
    "U8": ("uint8", 1, np.uint8),
    "BOOL": ("bool", 1, np.bool_),
}
KERNEL_DTYPES = frozenset({"BF16", "F16", "F32"})  # the safetensors codes merger.kernels reads and writes
FLOAT_CODES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


def torch_dtype(code: str) -> torch.dtype:
    import torch

    return getattr(torch, DTYPES[code][0])


def to_torch(a: np.ndarray, code: str) -> torch.Tensor:
    """A torch tensor sharing the memory of a view made by MappedReader (or of the same form)."""
    import torch

    return torch.from_numpy(a).view(torch_dtype(code))


INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
MAX_HEADER_BYTES = 100_000_000
CARD_NAME = "README.md"
# Copied from the tokenizer source (the base model unless the recipe names another).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
# Copied with config.json, from Plan.config_from (the base, else the first model, if it holds a config.json).
MODEL_FILES = ("generation_config.json", "preprocessor_config.json")


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as a safetensors header describes it: enough to plan, and to read it later."""

    name: str
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute byte offset of the data in `file`
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_CODES


class Remote(Protocol):
    """What a model read from the Hub says of where its files come from (merger.hub.Remote)."""

    repo_id: str
    commit: str
    files: dict  # name -> hub.RemoteFile (size, etag) of the repo's files at `commit`

    def fetch(self, name: str) -> Path: ...

    def drop(self, name: str) -> None: ...

    def verify(self, name: str, stop=None) -> dict: ...


def stamp(st: os.stat_result) -> tuple[int, int, int, int, int]:
    """A local file as merger saw it: size, modification and change times, inode, device. Rewriting a
    file changes its ctime and usually its inode, even where its size and mtime were put back."""
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


def same_file(seen: tuple, now: tuple) -> bool:
    """Whether two stamps are of one file, unchanged (the device left out: its number may differ
    between boots, as in the stamps a resumable output keeps)."""
    return seen[:4] == now[:4]


@dataclass
class LocalModel:
    """A model directory with safetensors weights, described by its headers.

    For a Hub model, `path` is its snapshot directory in the Hugging Face cache, where each file appears
    once fetched, and `remote` says how to fetch it; the headers were read from the Hub.
    """

    ref: str  # as written in the recipe
    path: Path
    files: list[Path]  # its weight files, as paths in `path`
    tensors: dict[str, TensorInfo] = field(repr=False)
    folder: Folder = field(repr=False)
    stamps: dict[Path, tuple] = field(default_factory=dict, repr=False)  # weight files read locally: stamp()
    remote: Remote | None = field(default=None, repr=False)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def name_of(self, file: Path) -> str:
        return file.relative_to(self.path).as_posix()

    def has(self, name: str) -> bool:
        """Whether the model holds the file `name` (a Hub model: in its repo, fetched or not). A local
        file that leads outside the folder, or is not a regular file, is refused here."""
        return name in self.remote.files if self.remote else self.folder.has(name)

    def open_weights(self, file: Path) -> BinaryIO:
        """One of its weight files, opened for mapping, refused if it changed since its header was read
        (or, fetched since, if it is not the size the Hub lists)."""
        name = self.name_of(file)
        f = self.folder.open(name)
        now = stamp(os.fstat(f.fileno()))
        seen = self.stamps.get(file)
        listed = self.remote.files[name].size if self.remote and name in self.remote.files else None
        if (seen is not None and not same_file(seen, now)) or (seen is None and listed not in (None, now[0])):
            f.close()
            raise InputChanged(f"'{self.ref}': {name} changed after merger read its header; run the command again")
        return f

    def check_unchanged(self) -> None:
        """Refused if a weight file changed, or was replaced, since its header was read: once the merge
        has read them, this is what makes the lock's hashes (remembered ones, or ones read while the
        merge ran) those of the bytes merged. A file removed since is no change to what the merge read
        (--low-disk drops Hub shards after their last read)."""
        for file, seen in self.stamps.items():
            try:
                now = stamp(os.stat(file))
            except FileNotFoundError:
                continue
            except OSError:
                now = None
            if now is None or not same_file(seen, now):
                raise InputChanged(
                    f"'{self.ref}': {self.name_of(file)} changed while merger merged it; run the command again"
                )


def read_config(model: LocalModel) -> dict | None:
    """The model's config.json as a dict (None if it has none, or a Hub model's is not fetched yet)."""
    if model.folder.stat("config.json") is None:
        return None
    _, data = read_support(model, "config.json")
    if not isinstance(data, dict):
        raise ModelError(f"'{model.ref}': config.json is not a JSON object")
    return data


# JSON support files copied into the output, checked when read: a "..._file" value that points outside
# the folder (tokenizer_config.json's vocab_file: /home/you/.ssh/id_rsa) would make transformers read
# that file when it loads the output, or merger's evaluator when it loads a candidate.
SUPPORT_JSON = {
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.json",
}


def read_support(model: LocalModel, name: str) -> tuple[bytes, object]:
    """A support file's bytes, read once, and for SUPPORT_JSON its parsed content (checked as above;
    None for other files): what is checked is what is copied."""
    raw = model.folder.read_bytes(name, support_limit(name))
    if name not in SUPPORT_JSON:
        return raw, None
    data = parse_json(raw, f"'{model.ref}': {name}")
    todo = [data]
    while todo:
        node = todo.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, value in items:
            if isinstance(key, str) and key.endswith("_file") and isinstance(value, str) and _escapes(value):
                raise ModelError(
                    f"'{model.ref}': {name} gives {key}: {value!r}, a file outside the model's folder; "
                    "refusing to copy it (transformers would read that file when loading the model)"
                )
            todo.append(value)
    return raw, data


def _escapes(value: str) -> bool:
    return value.startswith(("/", "~", "\\")) or ".." in value.replace("\\", "/").split("/") or ":" in value[1:3]


def read_header(folder: Folder, name: str) -> tuple[dict, int, tuple]:
    """(header dict, byte offset where tensor data starts, the file's stamp) of a safetensors file."""
    with folder.open(name) as f:
        st = stamp(os.fstat(f.fileno()))
        try:
            head = f.read(8)
            n = header_length(head, folder.path / name, st[0])
            raw = f.read(n)
        except OSError as e:
            raise ModelError(f"{folder.path / name}: cannot read: {e.strerror}") from None
    return parse_header(raw, n, folder.path / name), 8 + n, st


def header_length(head: bytes, file: Path | str, size: int) -> int:
    """The JSON header's length, from a safetensors file's first 8 bytes (the file is `size` bytes)."""
    if len(head) < 8:
        raise ModelError(f"{file}: not a safetensors file (shorter than 8 bytes)")
    (n,) = struct.unpack("<Q", head[:8])
    if n > MAX_HEADER_BYTES or n < 2:
        raise ModelError(f"{file}: not a safetensors file (header length {n} is implausible)")
    if 8 + n > size:
        raise ModelError(f"{file}: not a safetensors file (its header of {n} bytes runs past its end; truncated?)")
    return n


def parse_header(raw: bytes, n: int, file: Path | str) -> dict:
    if len(raw) != n:
        raise ModelError(f"{file}: truncated safetensors header")
    try:
        header = parse_json(raw, f"{file}: the safetensors header", unique_keys=True, depth=False)
    except ModelError as e:
        raise ModelError(f"{e} (not a safetensors file?)") from None
    if not isinstance(header, dict):
        raise ModelError(f"{file}: not a safetensors file (header is not a JSON object)")
    return header


def scan_file(folder: Folder, name: str) -> tuple[dict[str, TensorInfo], tuple]:
    """Describe every tensor of one safetensors file of a folder, checking the header against the file;
    also the file's stamp."""
    header, data_start, st = read_header(folder, name)
    return describe(header, data_start, st[0], folder.path / name), st


def _count(value: object) -> int | None:
    """A JSON integer (not a bool, a float or a string) that is not negative, else None."""
    return value if type(value) is int and value >= 0 else None


def describe(header: dict, data_start: int, size: int, file: Path, label: str | None = None) -> dict[str, TensorInfo]:
    """The tensors of a parsed header, for a file of `size` bytes (local, or remote and not fetched yet, in
    which case `file` is where it will be and `label` names it in errors). Checked as the safetensors
    library checks a file before reading it: known dtypes, shapes of non-negative integers, offsets
    that match the shapes, tensors that neither overlap nor leave gaps, and data that ends where the
    file does."""
    label = label or str(file)
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ModelError(f"{label}: the header's __metadata__ is not a map of strings (not a safetensors file?)")
    out: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        where = f"{label}: tensor '{name}'"
        if not isinstance(entry, dict):
            raise ModelError(f"{where}: its header entry is not an object")
        code, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(code, str) or code not in DTYPES:
            raise ModelError(f"{where}: unsupported dtype {code!r} (merger reads {', '.join(DTYPES)})")
        if not isinstance(shape, list) or any(_count(d) is None for d in shape):
            raise ModelError(f"{where}: shape {shape!r} is not a list of non-negative integers")
        if math.prod(d for d in shape if d) * DTYPES[code][1] >= 1 << 62 or len(shape) > 64:
            raise ModelError(f"{where}: shape {shape!r} is larger than any tensor merger can hold")
        if not isinstance(offsets, list) or len(offsets) != 2 or any(_count(x) is None for x in offsets):
            raise ModelError(f"{where}: data_offsets {offsets!r} is not a pair of non-negative integers")
        begin, end = offsets
        info = TensorInfo(name, code, tuple(shape), file, data_start + begin, end - begin)
        if end < begin or info.nbytes != info.numel * DTYPES[code][1]:
            raise ModelError(
                f"{where}: data_offsets {offsets} hold {end - begin} bytes, but shape {shape} of {code} needs "
                f"{info.numel * DTYPES[code][1]}"
            )
        if data_start + end > size:
            raise ModelError(f"{where}: its data runs past the end of the file (truncated?)")
        out[name] = info
    end = data_start
    for info in sorted(out.values(), key=lambda i: (i.start, i.nbytes)):
        if info.start != end:
            what = (
                "overlaps the tensor before it"
                if info.start < end
                else f"leaves {info.start - end} bytes unused before it"
            )
            raise ModelError(f"{label}: tensor '{info.name}' {what} (not a valid safetensors file)")
        end = info.start + info.nbytes
    if end != size:
        raise ModelError(f"{label}: {size - end} bytes follow the last tensor's data (not a valid safetensors file)")
    return out


def is_hub_id(ref: str) -> bool:
    """True for `org/name` or `org/name@revision` that does not exist as a local path."""
    if os.path.exists(ref) or ref.startswith((".", "/", "~")):
        return False
    repo = ref.split("@", 1)[0]
    parts = repo.split("/")
    return len(parts) == 2 and all(parts)


def not_here() -> str:
    """What a relative model reference that is not a local folder means, where merger runs."""
    return f"no such directory in the working directory ({os.getcwd()})"


def open_local(ref: str) -> LocalModel:
    """Read the headers of a local model directory. Raises ModelError with a message that names the
    reference and how to fix it."""
    path = Path(ref).expanduser()
    if not path.exists():
        raise ModelError(f"'{ref}': {not_here() if not path.is_absolute() else 'no such directory'}")
    if not path.is_dir():
        raise ModelError(f"'{ref}' is not a directory (a model is a directory of safetensors files)")
    folder = Folder.of(path, ref)
    if folder.has(INDEX_NAME):
        weight_map = read_index(folder.read_bytes(INDEX_NAME), ref)
        names = sorted(set(weight_map.values()))
        for name in names:
            if not folder.has(name):
                raise ModelError(f"'{ref}': {INDEX_NAME} names {name}, which is missing")
    else:
        weight_map = None
        names = [SINGLE_NAME] if folder.has(SINGLE_NAME) else sorted(p.name for p in folder.path.glob("*.safetensors"))
        if not names:
            raise no_weights(ref, [p.name for p in folder.path.iterdir()])
    scanned, stamps = {}, {}
    for name in names:
        scanned[folder.path / name], stamps[folder.path / name] = scan_file(folder, name)
    tensors = collect(ref, scanned, weight_map, folder.path)
    return LocalModel(ref, folder.path, sorted(scanned), tensors, folder, stamps)


def read_index(raw: bytes, ref: str) -> dict[str, str]:
    """The weight_map (tensor name -> file name) of a model.safetensors.index.json: every file a plain
    name of a .safetensors file inside the model's folder, and no key given twice (JSON keeps the last
    of a tensor named twice; as in a safetensors header, that is refused rather than guessed)."""
    try:
        weight_map = parse_json(raw, f"'{ref}': {INDEX_NAME}", unique_keys=True)["weight_map"]
        assert isinstance(weight_map, dict)
    except (KeyError, TypeError, AssertionError):
        raise ModelError(f"'{ref}': {INDEX_NAME} is not a valid index (no weight_map)") from None
    for name in weight_map.values():
        check_name(name, ref, INDEX_NAME)
        if not name.endswith(".safetensors"):
            raise ModelError(f"'{ref}': {INDEX_NAME} names {name!r}, which is not a .safetensors file")
    return weight_map


def collect(
    ref: str, scanned: dict[Path, dict[str, TensorInfo]], weight_map: dict[str, str] | None, root: Path
) -> dict[str, TensorInfo]:
    """A model's tensors from its scanned files: where the index puts them, if there is one."""
    tensors: dict[str, TensorInfo] = {}
    if weight_map is not None:
        for name, fname in weight_map.items():
            info = scanned[root / fname].get(name)
            if info is None:
                raise ModelError(f"'{ref}': {INDEX_NAME} puts tensor '{name}' in {fname}, which lacks it")
            tensors[name] = info
        return tensors
    for f, infos in scanned.items():
        for name, info in infos.items():
            if name in tensors:
                raise ModelError(f"'{ref}': tensor '{name}' is in both {tensors[name].file.name} and {f.name}")
            tensors[name] = info
    return tensors


def no_weights(ref: str, names: list[str]) -> ModelError:
    """The error for a model without safetensors weights, given the names of its files."""
    pickled = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))
    if not pickled:
        return ModelError(f"'{ref}' holds no model.safetensors, {INDEX_NAME} or *.safetensors file")
    if any(n.startswith("pytorch_model") and n.endswith(".bin") for n in pickled):  # transformers' names
        how = convert_command(ref)
    else:  # names of its own (a stranger's: never put into a command)
        how = (
            "load each weight file with torch.load(f, weights_only=True) and write its tensors with safetensors' "
            "save_file (a tensor that shares another's memory, as tied embeddings do, once)"
        )
    return ModelError(
        f"'{ref}' holds only pickled weights ({', '.join(pickled[:3])}); merger reads safetensors only, since "
        f"pickles can run code. Convert them once, each tensor kept under its name: {how}"
    )


# Beside each pytorch_model*.bin, the same tensors as safetensors, whatever the architecture: loaded by
# torch's weights_only unpickler (which runs no code), each under its own name, and a tensor that shares
# another's memory (tied embeddings: lm_head.weight) saved once, under its first name, as transformers
# saves it (save_file refuses shared tensors). pytorch_model.bin becomes model.safetensors, shard
# pytorch_model-00001-of-00002.bin model-00001-of-00002.safetensors (no index needed: merger reads every
# *.safetensors of a folder that has none).
CONVERT = (
    "import glob, torch; from safetensors.torch import save_file; "
    "[save_file({k: v.contiguous() for k, v in sd.items() if (key := (v.data_ptr() or k, v.shape, v.stride(), "
    "v.dtype)) not in seen and not seen.add(key)}, f.replace('pytorch_model', 'model')[:-4] + '.safetensors', "
    "{'format': 'pt'}) for f in sorted(glob.glob('pytorch_model*.bin')) "
    "for sd in [torch.load(f, map_location='cpu', weights_only=True)] for seen in [set()]]"
)


def convert_command(ref: str) -> str:
    """The shell line that runs CONVERT in `ref`'s folder; a Hub model's is downloaded first."""
    if not is_hub_id(ref):
        return f'cd {shlex.quote(os.path.expanduser(ref))} && python -c "{CONVERT}"'
    repo, _, revision = ref.partition("@")
    local = shlex.quote(repo.split("/")[-1] + "-safetensors")  # a new folder: never one of the user's
    get = f"hf download {shlex.quote(repo)}" + (f" --revision {shlex.quote(revision)}" if revision else "")
    return (
        f'test ! -e {local} && {get} --local-dir {local} && cd {local} && python -c "{CONVERT}", then name that '
        "folder in the recipe"
    )


class FileSource(Protocol):
    """Where the reader's input files come from: opened (fetched first, for Hub shards with --low-disk)
    when the reader first maps one, told when the engine is done with each tensor, and told when a file
    is unmapped for good."""

    def open(self, file: Path) -> BinaryIO:
        """`file` opened for reading, checked (see LocalModel.open_weights)."""
        ...

    def done(self, info: TensorInfo) -> bool:
        """The engine is done with tensor `info`; True if it was the last one needed from its file."""
        ...

    def release(self, file: Path) -> None:
        """The reader has unmapped `file` for good."""
        ...


class Confined:
    """The FileSource of models on disk: each file opened through its model's folder, as the plan saw it."""

    def __init__(self, models: list[LocalModel]):
        self._owner = {f: m for m in models for f in m.files}

    def open(self, file: Path) -> BinaryIO:
        return self._owner[file].open_weights(file)

    def done(self, info: TensorInfo) -> bool:
        return False

    def release(self, file: Path) -> None:
        pass


# A mapped input that shrinks under the merge (another process truncated it) kills the process with
# SIGBUS when a lost page is touched. A handler turns that into one line naming the file.

_mapped: dict[int, tuple[int, int, str]] = {}  # id(mapping) -> (start address, end address, file)
_on_fatal: list[Callable[[], None]] = []  # cleanups run before a SIGBUS ends the process
_handler = None


def watch_mapping(mm: mmap.mmap, path: Path) -> None:
    """Remember where `mm` (a mapping of `path`) lies, so that a SIGBUS in it (the file shrank: another
    process truncated it) ends the process with one line naming the file, instead of a crash."""
    if not len(mm):
        return
    _install()
    buf = (ctypes.c_char * 1).from_buffer(mm)
    start = ctypes.addressof(buf)
    del buf
    _mapped[id(mm)] = (start, start + len(mm), str(path))


def forget_mapping(mm: mmap.mmap) -> None:
    _mapped.pop(id(mm), None)


def on_fatal(cleanup: Callable[[], None]) -> Callable[[], None]:
    """Run `cleanup` if a SIGBUS ends the process (returns a function that cancels it)."""
    _on_fatal.append(cleanup)
    return lambda: _on_fatal.remove(cleanup) if cleanup in _on_fatal else None


_HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)


class _Sigaction(ctypes.Structure):  # glibc's struct sigaction on 64-bit Linux
    _fields_ = [
        ("sa_sigaction", _HANDLER),
        ("sa_mask", ctypes.c_ulong * 16),
        ("sa_flags", ctypes.c_int),
        ("sa_restorer", ctypes.c_void_p),
    ]


_SA_SIGINFO = 4
_SI_ADDR = 16  # offset of si_addr in siginfo_t on 64-bit Linux


def _on_sigbus(signum: int, info: int, context: int) -> None:
    addr = ctypes.c_void_p.from_address(info + _SI_ADDR).value or 0
    where = next((m for m in list(_mapped.values()) if m[0] <= addr < m[1]), None)
    if where is None:
        line = "error: bus error outside merger's input mappings (a hardware or memory fault?)\n"
    else:
        path = where[2]
        try:
            now = f"it is {os.stat(path).st_size} bytes now"
        except OSError:
            now = "it is gone now"
        line = (
            f"error: {path}: the file shrank while merger was reading it ({now}; another process truncated or "
            "rewrote it); nothing was written to the output\n"
        )
    os.write(2, line.encode(errors="replace"))
    for cleanup in list(_on_fatal):
        with contextlib.suppress(BaseException):
            cleanup()
    os._exit(2)


def _install() -> None:
    global _handler
    sigaction = getattr(system.libc(), "sigaction", None)
    if _handler is not None or sigaction is None or ctypes.sizeof(ctypes.c_void_p) != 8:
        return
    _handler = _HANDLER(_on_sigbus)
    action = _Sigaction()
    action.sa_sigaction = _handler
    action.sa_flags = _SA_SIGINFO
    if sigaction(signal.SIGBUS, ctypes.byref(action), None) != 0:
        _handler = False


def _huge_pages(mm: mmap.mmap) -> None:
    """Ask for transparent huge pages on a mapped input. Where the kernel caches a file in 2 MiB
    folios (Linux 6.x with large folio support) a fault on such a mapping reads ahead in 2 MiB folios
    and maps them one page-table entry each: after a first TIES merge read three TinyLlama models
    from disk, 48% of their pages were in 2 MiB folios against 5% without (measured; the read-ahead
    of the next tensor, MADV_WILLNEED, still makes small ones), and mapping those takes about 0.03 µs
    per 4 KiB instead of 0.3 µs, for every later merge or model load of the same files. Nothing
    changes where THP is off."""
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None and len(mm):
        with contextlib.suppress(OSError):  # a kernel without THP refuses it
            mm.madvise(advice)


class MappedReader:
    """Zero-copy tensor views over memory-mapped safetensors files.

    A view reads straight from the page cache (no copy into a buffer of ours). Pages are dropped from
    this process with MADV_DONTNEED once a tensor is done, so resident memory stays at a few tensors
    however large the checkpoint is, and the next tensor is announced with MADV_WILLNEED so the kernel
    reads it ahead while the current one is merged.
    """

    def __init__(self, files: FileSource) -> None:
        self._maps: dict[Path, mmap.mmap] = {}
        self.files = files

    def _map(self, file: Path) -> mmap.mmap:
        mm = self._maps.get(file)
        if mm is None:
            with self.files.open(file) as f:
                # ACCESS_COPY: a private mapping numpy and torch may wrap as writable; nothing is ever written
                mm = self._maps[file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            watch_mapping(mm, file)
            _huge_pages(mm)
        return mm

    def view(self, info: TensorInfo) -> np.ndarray:
        """The tensor as stored, as a numpy view in DTYPES' form (to_torch() makes it a tensor); valid
        until release()/close()."""
        _, size, dtype = DTYPES[info.dtype]
        if info.nbytes == 0:
            return np.empty(info.shape, dtype=dtype)
        if info.start % size:  # misaligned data (a writer that does not align): one copy
            raw = np.frombuffer(self._map(info.file), dtype=np.uint8, count=info.nbytes, offset=info.start)
            return raw.copy().view(dtype).reshape(info.shape)
        return np.frombuffer(self._map(info.file), dtype=dtype, count=info.numel, offset=info.start).reshape(info.shape)

    def _advise(self, info: TensorInfo, advice: int) -> None:
        if info.nbytes == 0:
            return
        mm = self._map(info.file)
        start = info.start - info.start % mmap.PAGESIZE
        end = min(info.start + info.nbytes, len(mm))
        if end > start:
            mm.madvise(advice, start, end - start)

    def prefetch(self, info: TensorInfo) -> None:
        self._advise(info, mmap.MADV_WILLNEED)

    def release(self, info: TensorInfo) -> None:
        if info.file in self._maps:
            self._advise(info, mmap.MADV_DONTNEED)
        if self.files.done(info):
            mm = self._maps.pop(info.file, None)
            if mm is not None:
                _unmap(mm)
            self.files.release(info.file)

    def close(self) -> None:
        for mm in self._maps.values():
            _unmap(mm)
        self._maps.clear()


def _unmap(mm: mmap.mmap) -> None:
    try:
        mm.close()
    except BufferError:  # a view is still alive: the mapping goes with it (and stays watched until then)
        return
    forget_mapping(mm)
