"""Model references: where a checkpoint's safetensors live and which tensors they hold, from headers alone."""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from merger.errors import ModelError

if TYPE_CHECKING:
    import torch

    from merger.hub import Hub, Remote

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
# Copied from the reference model (the base, else the first model).
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


@dataclass
class LocalModel:
    """A model directory with safetensors weights, described by its headers.

    For a Hub model, `path` is its snapshot directory in the Hugging Face cache, where each file appears
    once fetched, and `remote` says how to fetch it; the headers were read from the Hub.
    """

    ref: str  # as written in the recipe
    path: Path
    files: list[Path]
    tensors: dict[str, TensorInfo] = field(repr=False)
    remote: Remote | None = field(default=None, repr=False)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def has(self, name: str) -> bool:
        """Whether the model holds the file `name` (a Hub model: in its repo, fetched or not)."""
        return name in self.remote.files if self.remote else (self.path / name).is_file()


def read_config(model: LocalModel) -> dict | None:
    """The model's config.json as a dict (None if it has none, or a Hub model's is not fetched yet)."""
    path = model.path / "config.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"'{model.ref}': config.json is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelError(f"'{model.ref}': config.json is not a JSON object")
    return data


def read_header(file: Path) -> tuple[dict, int]:
    """Return (header dict, byte offset where tensor data starts) of a safetensors file."""
    try:
        with open(file, "rb") as f:
            head = f.read(8)
            n = header_length(head, file)
            raw = f.read(n)
    except OSError as e:
        raise ModelError(f"{file}: cannot read: {e.strerror}") from None
    return parse_header(raw, n, file), 8 + n


def header_length(head: bytes, file: Path | str) -> int:
    """The JSON header's length, from a safetensors file's first 8 bytes."""
    if len(head) < 8:
        raise ModelError(f"{file}: not a safetensors file (shorter than 8 bytes)")
    (n,) = struct.unpack("<Q", head[:8])
    if n > MAX_HEADER_BYTES:
        raise ModelError(f"{file}: not a safetensors file (header length {n} is implausible)")
    return n


def parse_header(raw: bytes, n: int, file: Path | str) -> dict:
    if len(raw) != n:
        raise ModelError(f"{file}: truncated safetensors header")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelError(f"{file}: not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise ModelError(f"{file}: not a safetensors file (header is not a JSON object)")
    return header


def scan_file(file: Path) -> dict[str, TensorInfo]:
    """Describe every tensor of one safetensors file, checking offsets against the file size."""
    header, data_start = read_header(file)
    return describe(header, data_start, file.stat().st_size, file)


def describe(header: dict, data_start: int, size: int, file: Path, label: str | None = None) -> dict[str, TensorInfo]:
    """The tensors of a parsed header, for a file of `size` bytes (local, or remote and not fetched yet, in
    which case `file` is where it will be and `label` names it in errors)."""
    label = label or str(file)
    out: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            code = entry["dtype"]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ModelError(f"{label}: malformed header entry for tensor '{name}'") from None
        if code not in DTYPES:
            raise ModelError(f"{label}: tensor '{name}' has unsupported dtype {code}")
        info = TensorInfo(name, code, shape, file, data_start + begin, end - begin)
        if info.nbytes != info.numel * DTYPES[code][1] or data_start + end > size or begin < 0:
            raise ModelError(f"{label}: tensor '{name}' has inconsistent offsets (truncated file?)")
        out[name] = info
    return out


def cache_dir() -> Path:
    """merger's own cache: $MERGER_CACHE_DIR, else $XDG_CACHE_HOME/merger, else ~/.cache/merger."""
    if os.environ.get("MERGER_CACHE_DIR"):
        return Path(os.environ["MERGER_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "merger"


_hashes: dict[str, str] | None = None


def sha256_file(path: Path) -> str:
    """The sha256 of a file's bytes. Remembered in the cache by (path, size, mtime), so a model that has
    not changed is read for hashing once, not at every merge."""
    global _hashes
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    store = cache_dir() / "sha256.json"
    if _hashes is None:
        try:
            _hashes = json.loads(store.read_text())
        except (OSError, ValueError):
            _hashes = {}
    if key in _hashes:
        return _hashes[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    _hashes[key] = h.hexdigest()
    with contextlib.suppress(OSError):  # a read-only home only costs the next run a re-hash
        store.parent.mkdir(parents=True, exist_ok=True)
        tmp = store.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(_hashes))
        os.replace(tmp, store)
    return _hashes[key]


def is_hub_id(ref: str) -> bool:
    """True for `org/name` or `org/name@revision` that does not exist as a local path."""
    if os.path.exists(ref) or ref.startswith((".", "/", "~")):
        return False
    repo = ref.split("@", 1)[0]
    parts = repo.split("/")
    return len(parts) == 2 and all(parts)


def open_model(ref: str, hub: Hub | None = None) -> LocalModel:
    """Resolve a recipe's model reference (a local directory or a Hub id) and read its headers.

    Raises ModelError with a message that names the reference and how to fix it.
    """
    if is_hub_id(ref):
        from merger.hub import Hub

        return (hub or Hub()).open(ref)
    path = Path(ref).expanduser()
    if not path.exists():
        raise ModelError(f"'{ref}': no such directory")
    if not path.is_dir():
        raise ModelError(f"'{ref}' is not a directory (a model is a directory of safetensors files)")
    path = path.resolve()

    index = path / INDEX_NAME
    if index.exists():
        try:
            weight_map = read_index(index.read_text(), ref)
        except OSError as e:
            raise ModelError(f"'{ref}': cannot read {INDEX_NAME}: {e.strerror}") from None
        files = sorted({path / f for f in weight_map.values()})
        for f in files:
            if not f.exists():
                raise ModelError(f"'{ref}': {INDEX_NAME} names {f.name}, which is missing")
        return LocalModel(ref, path, files, collect(ref, {f: scan_file(f) for f in files}, weight_map, path))

    files = [path / SINGLE_NAME] if (path / SINGLE_NAME).exists() else sorted(path.glob("*.safetensors"))
    if not files:
        raise no_weights(ref, [p.name for p in path.iterdir()])
    return LocalModel(ref, path, files, collect(ref, {f: scan_file(f) for f in files}, None, path))


def read_index(text: str, ref: str) -> dict[str, str]:
    """The weight_map (tensor name -> file name) of a model.safetensors.index.json."""
    try:
        weight_map = json.loads(text)["weight_map"]
        assert isinstance(weight_map, dict)
    except (ValueError, KeyError, TypeError, AssertionError):
        raise ModelError(f"'{ref}': {INDEX_NAME} is not a valid index (no weight_map)") from None
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
    if pickled:
        return ModelError(
            f"'{ref}' holds only pickled weights ({', '.join(pickled[:3])}); merger reads safetensors "
            'only, since pickles can run code. Convert once with: python -c "from transformers import '
            f"AutoModel; AutoModel.from_pretrained('{ref}').save_pretrained('{ref}-st')\""
        )
    return ModelError(f"'{ref}' holds no model.safetensors, {INDEX_NAME} or *.safetensors file")


class FileSource(Protocol):
    """Input files that appear on demand (Hub shards with --low-disk): the reader asks for a file's local
    path when it first maps it, says when the engine is done with each tensor, and unmaps a file before
    it is released."""

    def path(self, file: Path) -> Path:
        """A readable local path for `file`, fetched first if need be."""
        ...

    def done(self, info: TensorInfo) -> bool:
        """The engine is done with tensor `info`; True if it was the last one needed from its file."""
        ...

    def release(self, file: Path) -> None:
        """The reader has unmapped `file` for good."""
        ...


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

    def __init__(self, files: FileSource | None = None) -> None:
        self._maps: dict[Path, mmap.mmap] = {}
        self.files = files

    def _map(self, file: Path) -> mmap.mmap:
        mm = self._maps.get(file)
        if mm is None:
            with open(self.files.path(file) if self.files else file, "rb") as f:
                # ACCESS_COPY: a private mapping numpy and torch may wrap as writable; nothing is ever written
                mm = self._maps[file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
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
        start = info.start - info.start % mmap.PAGESIZE
        end = min(info.start + info.nbytes, self._map(info.file).size())
        self._map(info.file).madvise(advice, start, end - start)

    def prefetch(self, info: TensorInfo) -> None:
        self._advise(info, mmap.MADV_WILLNEED)

    def release(self, info: TensorInfo) -> None:
        if info.file in self._maps:
            self._advise(info, mmap.MADV_DONTNEED)
        if self.files is not None and self.files.done(info):
            mm = self._maps.pop(info.file, None)
            if mm is not None:
                with contextlib.suppress(BufferError):  # a view is still alive: the space is freed with it
                    mm.close()
            self.files.release(info.file)

    def close(self) -> None:
        for mm in self._maps.values():
            with contextlib.suppress(BufferError):  # a view is still alive; the mapping goes with it
                mm.close()
        self._maps.clear()
