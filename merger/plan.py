"""The plan: every output tensor, its dtype and shard, worked out from the inputs' headers alone.

The plan is deterministic (tensors in natural name order, shards filled greedily), so any output shard
can be produced on its own.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import os
import struct
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from merger import budget, chat, system
from merger import device as merger_device
from merger.assemble import HEAD, Assembler, OutTensor, Source, tied_head, ties_head
from merger.errors import ModelError, RecipeError
from merger.files import support_limit
from merger.hub import Hub
from merger.layers import find_stacks, natural_key, stack_of
from merger.methods import TensorContext
from merger.recipe import MergeSpec
from merger.sources import (
    CARD_NAME,
    DTYPES,
    INDEX_NAME,
    KERNEL_DTYPES,
    MODEL_FILES,
    SUPPORT_JSON,
    TOKENIZER_FILES,
    LocalModel,
    is_hub_id,
    open_local,
    read_config,
    read_support,
)
from merger.vocab import (
    CHAT_FILES,
    TOKENIZER_JSON,
    NoVocabulary,
    TokenSettingError,
    Vocabulary,
    fits,
    lays_out,
    plan_vocabulary,
    read_chat_template,
    tokenizer_changes,
    tokenizer_config,
)

OUTPUT = "output"  # the role of a staged tensor's output among its pinned blocks (Plan.staging_blocks)
BLOCK = 4096  # what a file system rounds each file up to, at least (Plan.metadata_bytes)
FLAGS = 32  # bytes of the finiteness counts CudaStages copies back per slot (four int64: stream._finiteness)


def _slots(blocks: dict[int | str, int]) -> int:
    """Pinned bytes of CudaStages' two staging slots of `blocks` (by role) and of the flags."""
    return 2 * (sum(blocks.values()) + budget.pinned_block(FLAGS)) if blocks else 0


@dataclass(frozen=True)
class Shard:
    filename: str
    tensors: tuple[OutTensor, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def header(self) -> bytes:
        return shard_header(self.tensors)

    @property
    def file_size(self) -> int:
        return len(self.header) + self.nbytes


def shard_header(tensors: Iterable[OutTensor]) -> bytes:
    """The first bytes of a safetensors file holding `tensors` in this order: the header's length and
    the header, padded so that tensor data starts 8-byte aligned."""
    header: dict = {}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


@dataclass(frozen=True)
class FileUse:
    """Which tensors the merge reads from an input file, and how many times each (an overlapping slice
    reads a layer twice; a model listed twice is read twice), and the first and last output tensors
    reading it in write order (indices into Plan.tensors)."""

    first: int
    last: int
    reads: dict[str, int]


@dataclass
class Plan:
    spec: MergeSpec
    inputs: list[LocalModel]  # one per spec.ingredients
    base: LocalModel | None
    reference: LocalModel  # the base, else the first model: output dtypes and tensor names
    tokenizer_from: LocalModel
    shards: list[Shard]
    shard_size: int
    device: str  # "cpu" or "cuda"
    compute_dtype: str  # "float32" or "float64"
    device_reason: str = ""  # why that device (merger.device.choose)
    layers: int | None = None  # the reference's layers (merger.layers), None without any
    layer_origins: list[int] = field(default_factory=list)  # per output layer, the layer it was made from
    # where config.json and the generation files come from: the reference, or in a models: recipe the first
    # model (base first) holding a config.json where the reference holds none; None where no model holds one
    config_from: LocalModel | None = None
    # the output's vocabulary where the recipe gives a tokenizer source that changes the vocabulary tensors
    vocabulary: Vocabulary | None = None
    chat_template: str | None = None  # the recipe's, resolved (merger.chat); None: the tokenizer source's
    # the output's tokenizer files other than the source's (by name), and the source's it does not get
    tokenizer_made: dict[str, bytes] = field(default_factory=dict, repr=False, compare=False)
    tokenizer_dropped: frozenset[str] = frozenset()
    # per tensor name, what the method's model-wide pass found (stream.model_pass; empty without one)
    model_state: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    _pinned_caps: dict[int, int] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def tensors(self) -> list[OutTensor]:
        return [t for s in self.shards for t in s.tensors]

    @property
    def model_wide(self) -> bool:
        """Whether the method reads the whole model before merging any tensor (Method.model_prepare)."""
        method = self.spec.method
        return (
            method.model_prepare is not None and method.model_wide is not None and method.model_wide(self.spec.params)
        )

    def context(self, t: OutTensor) -> TensorContext:
        """What the method is told of tensor t: its own context, with the model-wide pass's finding."""
        state = self.model_state.get(t.name)
        return t.context if state is None else dataclasses.replace(t.context, model_state=state)

    @property
    def models(self) -> list[LocalModel]:
        """Every distinct model the merge reads (base first)."""
        out: dict[Path, LocalModel] = {}
        for m in ([self.base] if self.base else []) + self.inputs:
            out.setdefault(m.path, m)
        return list(out.values())

    @property
    def estimate(self) -> merger_device.Estimate:
        """The figures that decide between the CPU and the GPU (merger.device): each merged tensor's
        entries times the models it merges (the base aside: Method.cpu_ns is per model), through the
        fused kernels where the CPU engine would take them (fusable), else through torch."""
        fused = eager = 0
        for t in self.tensors:
            if t.merged:
                entries = t.numel * len(t.sources)
                if self.fusable(t):
                    fused += entries
                else:
                    eager += entries
        return merger_device.Estimate(
            entries=fused,
            eager_entries=eager,
            cpu_ns=self.spec.method.cpu_ns,
            bytes_read=self.bytes_read,
            bytes_written=self.bytes_written,
            cores=system.default_threads(),
        )

    def fusable(self, t: OutTensor) -> bool:
        """Whether the CPU engine merges t through the method's fused kernel (Merger._fusable, where numba
        loads): float32 compute, every dtype one it handles (ingredients of several dtypes: widened)."""
        return self.spec.method.fused is not None and self.not_fused(t) is None

    @property
    def torch_path(self) -> dict[str, int]:
        """How many merged tensors the CPU merges through torch instead of the method's fused kernel, by why
        (not_fused); nothing on CUDA."""
        if self.device != "cpu":
            return {}
        reasons = collections.Counter(self.not_fused(t) for t in self.tensors if t.merged)
        reasons.pop(None, None)
        return dict(reasons)

    def not_fused(self, t: OutTensor) -> str | None:
        """Why the method's fused kernel does not take t, which goes through torch (several times slower);
        None where it does, or where the method has none."""
        if self.spec.method.fused is None:
            return None
        if self.compute_dtype != "float32":
            return f"compute_dtype: {self.compute_dtype}"
        other = ({s.info.dtype for s in t.readers} | {t.dtype}) - KERNEL_DTYPES
        return f"{', '.join(sorted(other))}, which the kernels do not read or write" if other else None

    def widened(self, t: OutTensor) -> tuple[Source, ...]:
        """The ingredients of t that the CPU engine copies to float32 before its fused kernel reads them,
        each input tensor once: every one not stored in float32 where t's ingredients are stored in
        different dtypes (a float32 fine-tune beside bfloat16 ones), since the kernels read every ingredient
        in one dtype; the base may be stored in any. The copies are exact, so the output is the same."""
        mixed = len({s.info.dtype for s in t.sources}) > 1
        if self.device != "cpu" or not mixed or not t.merged or not self.fusable(t) or self.verbatim(t) is not None:
            return ()
        ingredients = {s.key for s in t.sources}
        return tuple(s for s in t.distinct if s.key in ingredients and s.info.dtype != "F32")

    @property
    def widening_memory(self) -> int:
        """Bytes of the engine's float32 copies of ingredients (widened), held for the whole run: the i-th
        copy of each tensor goes into the i-th buffer, grown to the largest tensor that needs it."""
        copies = [[4 * t.numel] * len(self.widened(t)) for t in self.tensors]
        return sum(max(buffer) for buffer in itertools.zip_longest(*copies, fillvalue=0))

    def verbatim(self, t: OutTensor) -> Source | None:
        """The input whose stored bytes are t's output bytes (Method.verbatim: passthrough at scale 1) where t
        keeps its dtype: the engine copies them file to file, on any device."""
        pick = self.spec.method.verbatim
        i = pick(t.models, t.params) if t.merged and pick is not None else None
        source = t.sources[i] if i is not None else None
        copied = source is not None and source.info.dtype == t.dtype and not lays_out(self.vocabulary, t.name)
        return source if copied else None

    def stored_bytes(self, t: OutTensor) -> int:
        """Bytes of t read from the inputs, as stored: every reader's copy."""
        return sum(s.info.nbytes for s in t.readers)

    def files_used(self) -> list[tuple[LocalModel, list[str]]]:
        """Each model the merge reads files of, with those files' names: its weights, and the support
        files it holds (support_names). What is fetched from the Hub, and what the lock records."""
        out: dict[Path, tuple[LocalModel, list[str]]] = {}
        for model in [*self.models, self.tokenizer_from]:
            if model.path not in out:
                weights = [model.name_of(f) for f in model.files]
                out[model.path] = (model, weights + [n for n in self.support_names(model) if model.has(n)])
        return list(out.values())

    def config_note(self) -> str | None:
        """Where the output's config.json comes from, when not from the reference (`merger plan`, and for
        none at all `merger apply` too)."""
        if self.config_from is None:
            held = "none of the models holds" if self.spec.slices is None else f"'{self.reference.ref}' holds no"
            return f"{held} a config.json: the output has none (transformers needs one to load it)"
        if self.config_from.path != self.reference.path:
            return f"from '{self.config_from.ref}' ('{self.reference.ref}' holds none), with the generation files"
        return None

    def support_names(self, model: LocalModel) -> list[str]:
        """The files besides its weights the merge may read from `model`, by its part in the merge: every
        input's index and model card (for its license), config_from's config and generation files, the
        tokenizer source's tokenizer files."""
        names = [INDEX_NAME, CARD_NAME]
        if self.config_from is not None and model.path == self.config_from.path:
            names += ["config.json", *MODEL_FILES]
        if model.path == self.tokenizer_from.path:
            names += TOKENIZER_FILES
        elif self.spec.vocabulary is not None:  # every model's vocabulary is read (merger.vocab)
            names += [TOKENIZER_JSON]
        if self.spec.vocabulary is not None and "config.json" not in names:
            names += ["config.json"]
        if self.spec.recipe.chat_template == "auto":  # every model's template is read
            names += [n for n in CHAT_FILES if n not in names]
        return names

    def metadata_bytes(self) -> int:
        """Disk the output takes besides its shards' data, about: their headers, the support files it copies
        (config and generation files, tokenizer files, at their sources' sizes), the index, the card, the lock
        and the partial output's records, each file rounded up to a BLOCK."""
        copied = [(self.config_from, n) for n in ("config.json", *MODEL_FILES)] if self.config_from else []
        copied += [(self.tokenizer_from, n) for n in TOKENIZER_FILES]
        sizes = [size for m, n in copied if (size := support_size(m, n)) is not None]
        index = sum(len(t.name) + len(s.filename) + 12 for s in self.shards for t in s.tensors) + 256
        headers = sum(len(s.header) for s in self.shards)
        inputs = sum(len(names) for _, names in self.files_used())  # each listed, with its hash, by lock and state
        records = (16 << 10) + 2 * 256 * inputs  # the card, the lock, the partial output's state
        files = 2 * len(self.shards) + len(sizes) + 4  # shards and their done records, copies, index, card, lock, state
        return headers + sum(sizes) + index + records + files * BLOCK

    def file_uses(self, shards: list[int] | None = None) -> dict[Path, FileUse]:
        """For each input file, the tensors read from it and when (in the order of `shards`, default all):
        what fetching Hub shards just in time, and dropping them after their last tensor, relies on."""
        first: dict[Path, int] = {}
        last: dict[Path, int] = {}
        reads: dict[Path, dict[str, int]] = {}
        chosen = self.shards if shards is None else [self.shards[i] for i in shards]
        for i, t in enumerate(t for s in chosen for t in s.tensors):
            for s in t.readers:  # each released once after its tensor (stream.Merger.release)
                f = s.info.file
                first.setdefault(f, i)
                last[f] = i
                reads.setdefault(f, {})
                reads[f][s.name] = reads[f].get(s.name, 0) + 1
        return {f: FileUse(first[f], last[f], reads[f]) for f in first}

    @property
    def bytes_read(self) -> int:
        return sum(self.stored_bytes(t) for t in self.tensors)

    @property
    def bytes_written(self) -> int:
        return sum(s.nbytes for s in self.shards)

    def staging_blocks(self, t: OutTensor) -> dict[int | str, int]:
        """The pinned blocks one slot of CudaStages' staging takes for t, by role (each input's place
        among t.distinct, and OUTPUT): its bytes there, rounded up as torch's pinned allocator does."""
        blocks = {i: budget.pinned_block(t.numel * DTYPES[s.info.dtype][1]) for i, s in enumerate(t.distinct)}
        blocks[OUTPUT] = budget.pinned_block(t.nbytes)
        return blocks

    def pinned_bytes(self, t: OutTensor) -> int:
        """Pinned host memory for staging t whole on CUDA: two slots of its staging blocks and of the
        merge's finiteness flags."""
        return _slots(self.staging_blocks(t))

    def staging_sizes(self, whole: Callable[[OutTensor], bool]) -> dict[int | str, int]:
        """By role (staging_blocks), the largest block of the tensors staged whole (`whole`): CudaStages
        sizes each staging buffer so from the start, since one that grew would leave its outgrown block
        pinned (torch's allocator keeps it for a request of its size)."""
        sizes: dict[int | str, int] = {}
        for t in self.tensors:
            if t.merged and whole(t):
                for role, block in self.staging_blocks(t).items():
                    sizes[role] = max(sizes.get(role, 0), block)
        return sizes

    def gpu_bytes(self, t: OutTensor, piece: int | None = None) -> int:
        """GPU memory for merging t on CUDA whole, or `piece` entries at a time: the method's buffers
        (Method.gpu: fn's, or before them prepare's beside the task vectors) over its inputs in the
        compute dtype, and the result in t's dtype beside the previous one, still on its way back;
        whole, also the inputs as uploaded and as much again for the next tensor's, uploaded meanwhile,
        and for the previous one's, not yet free (counted as t's own); in pieces, a piece as uploaded, before its cast. Every buffer rounded up
        to budget.GPU_BLOCK."""
        phases, buffers = self._gpu_terms(t, whole=piece is None)
        entries = t.numel if piece is None else piece
        return max(per_entry * entries + fixed for per_entry, fixed in phases) + buffers * budget.GPU_BLOCK

    def _gpu_terms(self, t: OutTensor, whole: bool) -> tuple[list[tuple[int, int]], int]:
        """gpu_bytes as ([(bytes per entry, bytes whatever the size)] for fn, and for prepare if any;
        how many tensor-sized buffers)."""
        method, csize, models = self.spec.method, np.dtype(self.compute_dtype).itemsize, len(t.sources)
        footprint = method.gpu
        stored = [DTYPES[s.info.dtype] for s in t.distinct]
        cast = [size for name, size, _ in stored if name != self.compute_dtype]  # converted on the GPU
        if whole:
            # t's uploads, the next tensor's (staged meanwhile), and the previous one's: its memory is
            # the copy stream's to reuse only once the compute stream is past that merge, which the host
            # does not wait for before staging the next
            engine = len(cast) * csize + 3 * sum(size for _, size, _ in stored)
            buffers = len(cast) + 3 * len(stored)
        else:
            engine = len(stored) * csize + max(cast, default=0)
            buffers = len(stored) + 1
        result = 2 * DTYPES[t.dtype][1]
        # whole matrices or masks, whatever the piece; per-row statistics, whole or not
        gathered = footprint.row_bytes(models, _rows(t)) + (
            0 if whole else (footprint.held_whole * csize + footprint.held_whole_masks_per_model * models) * t.numel
        )
        phases = [(engine + footprint.bytes_per_entry(models, csize) + result, gathered)]
        if method.prepare is not None:
            vectors = models * csize if whole else 0  # fn makes them whole; in pieces they are the loaded inputs
            # beside the previous tensor's result, still on its way back
            held = engine + vectors + DTYPES[t.dtype][1]
            gathered += 0 if whole else footprint.prepare_whole * csize * t.numel  # DELLA's magnitudes
            gathered += footprint.block_bytes(tuple(t.shape))
            phases.append(
                (held + footprint.prepare_bytes_per_entry(csize), footprint.fixed_per_model * models + gathered)
            )
            phases.append((held, footprint.settle_per_model * models + gathered))  # between passes over the chunks
        return phases, buffers + footprint.buffers(models) + 2

    def merges_whole(self, t: OutTensor, gpu: int, pinned: int) -> bool:
        """Whether CUDA merges t as one tensor (staged, uploaded, merged, copied back), else in pieces:
        its merge fits the GPU budget `gpu`, and its staging the `pinned` one together with that of
        every tensor staged whole (_pinned_cap)."""
        return not t.merged or (self.gpu_bytes(t) <= gpu and self.pinned_bytes(t) <= self._pinned_cap(pinned))

    def _pinned_cap(self, pinned: int) -> int:
        """The most pinned_bytes(t) of a tensor staged whole within `pinned` bytes: the largest need such
        that the staging buffers of every tensor needing no more (staging_sizes) fit."""
        if pinned not in self._pinned_caps:
            sizes: dict[int | str, int] = {}
            cap = 0
            merged = sorted((t for t in self.tensors if t.merged), key=self.pinned_bytes)
            for need, same in itertools.groupby(merged, key=self.pinned_bytes):
                for t in same:
                    for role, block in self.staging_blocks(t).items():
                        sizes[role] = max(sizes.get(role, 0), block)
                if _slots(sizes) > pinned:
                    break
                cap = need
            self._pinned_caps[pinned] = cap
        return self._pinned_caps[pinned]

    def gpu_piece(self, t: OutTensor, gpu: int) -> int:
        """Entries per GPU piece of t when it is too large to merge whole: budget.GPU_PIECE, fewer where
        that would not fit in `gpu` bytes (but at least 64K)."""
        phases, buffers = self._gpu_terms(t, whole=False)
        fits = min((gpu - buffers * budget.GPU_BLOCK - fixed) // per_entry for per_entry, fixed in phases)
        return min(budget.GPU_PIECE, max(1 << 16, fits), max(t.numel, 1))

    @property
    def write_depth(self) -> int:
        """Output buffers in flight between the merge and the writer thread. On the CPU, budget.WRITE_AHEAD
        bytes of pieces: the writer goes on writing one tensor while the next one's whole-tensor passes
        (TIES thresholds) produce nothing to write. With two pieces it sat idle then and the merge waited
        for it afterwards; 16 made TIES about 10% faster on 2 cores (README, Performance). On CUDA two,
        since a whole tensor's buffer there is pinned memory."""
        if self.device == "cuda":
            return 2
        itemsize = max((DTYPES[t.dtype][1] for t in self.tensors if t.merged), default=4)  # copied ones are small
        return max(2, budget.WRITE_AHEAD // (budget.PIECE * itemsize))

    @property
    def peak_memory(self) -> int:
        """Estimated working memory beyond the Python process itself. Per tensor: the inputs' pages
        (mapped while the tensor is merged, then dropped) and the output buffers queued for the writer
        (write_depth): on the CPU of a piece (budget.PIECE entries) each, on CUDA two of the
        tensor. On the CPU the merge runs through a few chunk buffers (TIES also gathers the entries
        near each trim threshold); on CUDA whole tensors are staged in pinned host memory, two
        tensors' worth (the next one is uploaded while one merges), and a tensor too large for the
        GPU whole goes in pieces (gpu_piece entries); the pinned memory stays for the whole run
        (peak_pinned_memory)."""
        csize = np.dtype(self.compute_dtype).itemsize
        whole, piece = self._gpu_rules()
        depth = self.write_depth
        worst = 0
        for t in self.tensors:
            raw = self.stored_bytes(t)
            if lays_out(self.vocabulary, t.name):  # new arrays beside the inputs' pages
                raw += sum(t.numel * DTYPES[s.info.dtype][1] for s in t.distinct)
            if self.device == "cuda":  # its pages, and the next tensor's while the stager copies them
                host = raw * 2 if whole(t) else raw
            else:  # output buffers of a piece each
                numel = t.numel
                host = raw + depth * min(numel, budget.PIECE) * DTYPES[t.dtype][1]
                host += min(numel, budget.CHUNK) * csize * (len(t.readers) + 8)
                if self.spec.method.prepare is not None:  # each gathered band, and a band pass per thread
                    per_model, per_tensor = self.spec.method.bands
                    gathered = min(numel, budget.gathered_most(numel)) + system.default_threads() * budget.CHUNK
                    host += gathered * 12 * (per_model * len(t.sources) + per_tensor)
                if t.merged and not self.fusable(t):  # the torch path: what its functions hold of the whole tensor
                    host += self._held_whole(t, csize)
            worst = max(worst, host)
        return worst + self.peak_pinned_memory + self.widening_memory

    def _held_whole(self, t: OutTensor, csize: int) -> int:
        """Bytes the method's torch functions hold of t as a whole however small their chunks (Method.gpu)."""
        footprint, models = self.spec.method.gpu, len(t.sources)
        words = footprint.held_whole + (footprint.prepare_whole if self.spec.method.prepare is not None else 0)
        per_entry = words * csize + footprint.held_whole_masks_per_model * models
        fixed = footprint.fixed_per_model * models + footprint.block_bytes(tuple(t.shape))
        return per_entry * t.numel + fixed + footprint.row_bytes(models, _rows(t))

    @property
    def peak_gpu_memory(self) -> int:
        """Estimated GPU memory on CUDA (gpu_bytes): the largest tensor merged whole, or a piece of one
        merged in pieces."""
        if self.device != "cuda":
            return 0
        whole, piece = self._gpu_rules()
        merged = [t for t in self.tensors if t.merged]
        return max((self.gpu_bytes(t) if whole(t) else self.gpu_bytes(t, piece(t)) for t in merged), default=0)

    @property
    def peak_pinned_memory(self) -> int:
        """Estimated pinned host memory on CUDA, held from first use to the end of the run: CudaStages'
        staging buffers (staging_sizes) and the piece buffers of the tensors merged in pieces."""
        if self.device != "cuda":
            return 0
        whole, piece = self._gpu_rules()
        pieced = [t for t in self.tensors if t.merged and not whole(t)]
        return _slots(self.staging_sizes(whole)) + self._piece_pinned(pieced, piece)

    def _piece_pinned(self, pieced: list[OutTensor], piece: Callable[[OutTensor], int]) -> int:
        """Pinned bytes of stream.PieceCopies' buffers for the tensors `pieced`: two for each input (by
        its place among the sources, and the base) and for the result, each of which may keep a block of
        every power of two it grew through, for a full piece or a tensor's last, shorter one."""
        classes: dict[object, set[int]] = {}
        for t in pieced:
            p = piece(t)
            roles: dict[object, Source] = dict(enumerate(t.sources)) | ({"b": t.base} if t.base else {})
            sizes = {role: DTYPES[s.info.dtype][1] for role, s in roles.items()}
            for role, size in (sizes | {"result": DTYPES[t.dtype][1]}).items():
                classes.setdefault(role, set()).update(budget.pinned_block(n * size) for n in {p, t.numel % p} - {0})
        return 2 * sum(sum(c) for c in classes.values())

    @property
    def gpu_pieced(self) -> list[str]:
        """On CUDA, the tensors too large for the GPU (or pinned) budget to merge whole: they go through
        the GPU in pieces (stream.CudaStages)."""
        whole, _ = self._gpu_rules()
        return [t.name for t in self.tensors if not whole(t)]

    def _gpu_rules(self):
        """(t -> whether CUDA merges t whole, t -> entries per piece otherwise), as stream.CudaStages."""
        if self.device != "cuda":
            return (lambda t: True), (lambda t: t.numel)
        gpu, pinned = budget.gpu_budget(), budget.pinned_budget()
        return (lambda t: self.merges_whole(t, gpu, pinned)), (lambda t: self.gpu_piece(t, gpu))


def cuda_available() -> bool:
    """Whether torch sees a CUDA device. Importing torch takes about two seconds, which a CPU merge
    does not otherwise need: a Linux machine without the NVIDIA driver is answered without it."""
    if sys.platform.startswith("linux") and "torch" not in sys.modules and not os.path.exists("/proc/driver/nvidia"):
        return False
    import torch

    return torch.cuda.is_available()


def open_model(ref: str, hub: Hub | None = None) -> LocalModel:
    """A recipe's model reference, its headers read: a local directory, else a Hub id (org/name[@rev])."""
    model, plus, adapter = ref.partition("@")[0].partition("+")
    if (
        plus
        and adapter
        and not os.path.exists(os.path.expanduser(ref))
        and (os.path.isdir(os.path.expanduser(model)) or is_hub_id(model))
    ):
        raise ModelError(
            f"'{ref}': mergekit's model+LoRA form; merger does not apply LoRA adapters yet: merge the adapter "
            "into its model first (peft's merge_and_unload) and name that folder"
        )
    return (hub or Hub()).open(ref) if is_hub_id(ref) else open_local(ref)


def resolve_device(plan: Plan, requested: str) -> tuple[str, str]:
    """(device, why) for `requested` ("auto", "cpu" or "cuda"): auto picks the faster (merger.device)."""
    if requested == "cpu":
        return merger_device.choose(requested, False, plan.estimate, plan.spec.method.name)
    cuda = cuda_available()
    if requested == "cuda" and not cuda:
        raise ModelError("device cuda was asked for, but torch sees no CUDA device; use --device cpu")
    return merger_device.choose(requested, cuda, plan.estimate, plan.spec.method.name)


def build_plan(
    spec: MergeSpec,
    *,
    device: str | None = None,
    shard_size: int | None = None,
    hub: Hub | None = None,
    opened: dict[str, LocalModel] | None = None,
) -> Plan:
    """Open every model's headers, check they agree, and lay out the output. Reads no tensor data (for
    Hub models, `hub` reads the headers remotely and downloads nothing but the index, and where the recipe
    sets a vocabulary or `chat_template: auto` their tokenizer files and config). `opened`: models already
    opened, by reference (a search planning many merges of the same models)."""
    recipe = spec.recipe
    base, inputs, tok, where_of, opened = _open_models(spec, hub, dict(opened or {}))
    reference = base or (inputs[0] if spec.slices is None else opened[spec.slices[0].inputs[0].ref])
    config_from = _config_source(spec, reference, base, inputs, where_of)
    # In a models: recipe every model must hold the reference's tensors, with the same shapes (and for
    # non-float tensors, the same dtype, since they are copied rather than merged); slices are checked
    # tensor by tensor (merger.assemble).
    models = opened_in_order(spec, opened)
    vocabulary, why = _vocabulary(spec, opened, models, base, reference)
    problems = []
    checked = {reference.path}
    for model in ([base] if base else []) + inputs if spec.slices is None else []:
        if model.path not in checked:
            checked.add(model.path)
            problems += _compare(reference, model, where_of[model.path], vocabulary)
    try:
        if problems:
            tied = _tied_hint(problems, models)
            raise RecipeError(list(dict.fromkeys(problems)) + ([tied] if tied else []))
        assembly = Assembler(spec, opened, reference, vocabulary).assemble()
    except RecipeError as e:  # with what explains rows that differ, first or last
        hint = _rows_hint(spec, reference, list(opened.values()))
        raise RecipeError(([why] if why else []) + e.problems + ([hint] if hint else [])) from None
    if vocabulary is not None:
        _check_donors(spec, vocabulary, assembly.tensors, opened)
    tensors = sorted(assembly.tensors, key=lambda t: natural_key(t.name))
    size = shard_size or int(recipe.output.shard_size)
    plan = Plan(
        spec=spec,
        inputs=inputs,
        base=base,
        reference=reference,
        tokenizer_from=tok or reference,
        shards=layout(tensors, size),
        shard_size=size,
        device="cpu",
        compute_dtype=recipe.compute_dtype,
        layers=assembly.stack.count if assembly.stack else None,
        layer_origins=assembly.origins,
        config_from=config_from,
        vocabulary=vocabulary,
        chat_template=_chat_template(spec, models, tok or reference),
    )
    plan.tokenizer_made, plan.tokenizer_dropped = _tokenizer_changes(spec, plan)
    plan.device, plan.device_reason = resolve_device(plan, device or recipe.device)
    for model in plan.models + [plan.tokenizer_from]:
        try:
            check_support_files(plan, model)
        except ModelError as e:
            problems.append(f"{where_of[model.path]}: {e}")
    if problems:
        raise RecipeError(list(dict.fromkeys(problems)))
    return plan


def _vocabulary(
    spec: MergeSpec, opened, models: list[LocalModel], base: LocalModel | None, reference: LocalModel
) -> tuple[Vocabulary | None, str | None]:
    """(the output's vocabulary (merger.vocab) where the recipe gives a tokenizer source; why none is
    laid out where a base or model source's files cannot give it: a note, and the first line of any error
    about the tensors' rows). RecipeError where a model's files cannot give a vocabulary needed."""
    if spec.vocabulary is None:
        return None, None
    where = spec.where("tokenizer") if spec.recipe.tokenizer is not None else spec.where("tokenizer_source")
    notes: list[str] = []
    try:
        vocabulary = plan_vocabulary(spec, opened, models, base, reference, notes)
    except NoVocabulary as e:
        v = spec.vocabulary
        if v.source == "union" or v.tokens or v.pad_to_multiple_of:
            raise RecipeError([f"{where}: {e}"]) from None
        # what a tokenizer source always meant here before vocabularies were read: its files, the tensors as stored
        notes, vocabulary = [f"vocabularies not compared ({e}): the tensors' rows merged as stored"], None
    except TokenSettingError as e:
        raise RecipeError([f"{spec.where('tokenizer', 'tokens', e.token, 'source')}: {e}"]) from None
    except ModelError as e:
        raise RecipeError([f"{where}: {e}"]) from None
    for note in notes:  # once, however often the spec is planned
        if f"{where}: {note}" not in spec.source.notes:
            spec.source.notes.append(f"{where}: {note}")
    return vocabulary, f"{where}: {notes[0]}" if vocabulary is None and notes else None


def _rows_hint(spec: MergeSpec, reference: LocalModel, models: list[LocalModel]) -> str | None:
    """Where a recipe without a tokenizer source merges models whose tensors outside the layers differ in
    rows alone (fine-tunes that added tokens): what mergekit's configs say for them."""
    if spec.vocabulary is not None:
        return None
    stacks = find_stacks(reference.tensors)
    for model in models:
        for name, info in reference.tensors.items():
            theirs = model.tensors.get(name)
            rows_alone = theirs is not None and theirs.shape != info.shape and theirs.shape[1:] == info.shape[1:]
            if rows_alone and stack_of(stacks, name) is None:
                return (
                    f"{spec.source.name}: '{model.ref}' and '{reference.ref}' differ in the rows of '{name}', "
                    "as models with different vocabularies do: give tokenizer_source: union (or base, or one "
                    "model) to lay them out in one vocabulary, as mergekit does"
                )
    return None


def _tied_hint(problems: list[str], models: list[LocalModel]) -> str | None:
    """Why one checkpoint holds a head that others lack, where the others' input embeddings cannot stand in
    for it (merger.assemble.tied_head): their configs tie the two, and no one tensor is named as they are."""
    if not any(f"'{HEAD}'" in p for p in problems):
        return None
    for model in models:
        if ties_head(model):
            return (
                f"'{model.ref}' stores no {HEAD}: its config ties the head to the embeddings (tie_word_embeddings: "
                f"true), while another model stores a head of its own; its input embeddings would stand in for the "
                "head, as in mergekit, but no one tensor outside its layers is named as input embeddings are "
                "(embed_tokens, wte, embed_in, word_embeddings, tok_embeddings)"
            )
    return None


def _tokenizer_changes(spec: MergeSpec, plan: Plan) -> tuple[dict[str, bytes], frozenset[str]]:
    """vocab.tokenizer_changes for the plan, made now: RecipeError where the source's files cannot take them."""
    try:
        return tokenizer_changes(plan.vocabulary, plan.tokenizer_from, plan.chat_template)
    except ModelError as e:
        key = (
            "chat_template" if plan.vocabulary is None else "tokenizer" if spec.recipe.tokenizer else "tokenizer_source"
        )
        raise RecipeError([f"{spec.where(key)}: {e}"]) from None


def _check_donors(spec: MergeSpec, vocabulary: Vocabulary, tensors: list[OutTensor], opened) -> None:
    """The models `tokens:` takes rows from are inputs of every vocabulary tensor (a slice recipe's
    embeddings come from its first slice, its head from its last; a method that merges no base reads none)."""
    token_of: dict[Path, str] = {}  # each such model, and the first token that takes a row of it
    for row, setting in vocabulary.settings.items():
        for path, _ in setting.donors:
            token_of.setdefault(path, vocabulary.tokens[row])
    refs = {m.path: m.ref for m in opened.values()}
    for t in tensors:
        inputs = {s.model.path for s in t.distinct}
        missing = [p for p in token_of if p not in inputs] if t.name in vocabulary.tensors else []
        if missing:
            where = spec.where("tokenizer", "tokens", token_of[missing[0]], "source")
            raise RecipeError(
                [f"{where}: '{refs[missing[0]]}' is not merged into tensor '{t.name}', so no row of it can stand "
                 "in for a token there"]
            )  # fmt: skip


def opened_in_order(spec: MergeSpec, opened: dict[str, LocalModel]) -> list[LocalModel]:
    """The recipe's models, each once, in the order it names them (the base first)."""
    return list({opened[ref].path: opened[ref] for ref, _ in spec.references()}.values())


def _chat_template(spec: MergeSpec, models: list[LocalModel], tokenizer_from: LocalModel) -> str | None:
    """The recipe's chat template (merger.chat.resolve); for `auto` the one most of the models hold, in the
    recipe's order (mergekit's order is a set's). RecipeError where a model's files cannot say it."""
    value = spec.recipe.chat_template
    if value is None:
        return None
    try:
        tokenizer_config(tokenizer_from)  # where the template goes: checked before the merge
        return chat.resolve(value, [read_chat_template(m) for m in models] if value == "auto" else [])
    except ModelError as e:
        raise RecipeError([f"{spec.where('chat_template')}: {e}"]) from None


def _config_source(spec: MergeSpec, reference: LocalModel, base, inputs, where_of) -> LocalModel | None:
    """Plan.config_from: the reference, else in a models: recipe the first model holding a config.json
    (every model there holds the reference's tensors, checked after: its config fits); its config read and
    checked now, since it is copied into the output at the end."""
    for model in [reference] + (([base] if base else []) + inputs if spec.slices is None else []):
        try:
            if model.has("config.json"):
                read_config(model)
                return model
        except ModelError as e:
            raise RecipeError([f"{where_of[model.path]}: {e}"]) from None
    return None


def _open_models(spec: MergeSpec, hub: Hub | None, opened: dict[str, LocalModel]):
    """(base, inputs, tokenizer source, model path -> where the recipe first names it, every model by
    reference), or RecipeError listing every model that cannot be opened."""
    problems: list[str] = []
    where_of: dict[Path, str] = {}
    for ref, loc in spec.references() + (
        [(spec.tokenizer_source, ("tokenizer_source",))] if spec.tokenizer_source else []
    ):
        if ref not in opened:
            try:
                opened[ref] = open_model(ref, hub)
            except ModelError as e:
                problems.append(f"{spec.where(*loc)}: {e}")
                continue
        where_of.setdefault(opened[ref].path, spec.where(*loc))
    if problems:
        raise RecipeError(list(dict.fromkeys(problems)))
    base = opened[spec.base] if spec.base else None
    tok = opened[spec.tokenizer_source] if spec.tokenizer_source else None
    return base, [opened[g.ref] for g in spec.ingredients], tok, where_of, opened


def support_size(model: LocalModel, name: str) -> int | None:
    """The size of `model`'s file `name` (a Hub model's as it lists it), None where it holds none."""
    if model.remote is not None:
        return model.remote.files[name].size if name in model.remote.files else None
    st = model.folder.stat(name)
    return None if st is None else st.st_size


def check_support_files(plan: Plan, model: LocalModel, fetched: bool = False) -> None:
    """The files besides the weights that the merge reads from `model` (Plan.support_names): regular
    files inside its folder, of at most files.support_limit bytes, and JSON ones well formed
    (sources.read_support). For a Hub model, the sizes it lists, then (`fetched`) the files themselves."""
    for name in plan.support_names(model):
        size = support_size(model, name)
        if size is None:
            continue
        if size > support_limit(name):
            raise ModelError(
                f"'{model.ref}': {name} is {size} bytes, more than the {support_limit(name)} merger reads of such a file"
            )
        if name in SUPPORT_JSON and (model.remote is None or fetched):
            read_support(model, name)


def _rows(t: OutTensor) -> int:
    """t's rows: its entries over its last dimension's (one for a vector or a scalar)."""
    return t.numel // t.shape[-1] if len(t.shape) >= 2 and t.shape[-1] else 1


def layout(tensors: list[OutTensor], shard_size: int) -> list[Shard]:
    """Fill shards in order; a tensor larger than shard_size gets a shard of its own."""
    groups: list[list[OutTensor]] = [[]]
    used = 0
    for t in tensors:
        if groups[-1] and used + t.nbytes > shard_size:
            groups.append([])
            used = 0
        groups[-1].append(t)
        used += t.nbytes
    n = len(groups)
    return [Shard(f"model-{i + 1:05d}-of-{n:05d}.safetensors", tuple(g)) for i, g in enumerate(groups)]


def _compare(
    ref: LocalModel, other: LocalModel, where: str, vocabulary: Vocabulary | None = None, limit: int = 5
) -> list[str]:
    """The differences of `other`'s tensors from `ref`'s (vocab.fits: a vocabulary tensor's rows may differ
    in number)."""
    problems = []
    for name, info in ref.tensors.items():
        theirs = other.tensors.get(name)
        if theirs is None and name == HEAD and tied_head(other):  # its embeddings stand in (merger.assemble)
            continue
        if theirs is None:
            problems.append(f"{where}: '{other.ref}' lacks tensor '{name}' (present in '{ref.ref}')")
        elif not fits(vocabulary, name, theirs.shape, info.shape):
            problems.append(
                f"{where}: tensor '{name}' has shape {list(theirs.shape)} in '{other.ref}' "
                f"but {list(info.shape)} in '{ref.ref}'"
            )
        elif info.is_float != theirs.is_float or (not info.is_float and info.dtype != theirs.dtype):
            problems.append(
                f"{where}: tensor '{name}' is {theirs.dtype} in '{other.ref}' but {info.dtype} in '{ref.ref}'"
            )
    for name in sorted(other.tensors.keys() - ref.tensors.keys(), key=natural_key):  # the same order every run
        if name == HEAD and tied_head(ref):
            continue
        problems.append(f"{where}: '{other.ref}' has tensor '{name}' that '{ref.ref}' lacks")
    if len(problems) > limit:
        problems = problems[:limit] + [f"{where}: ... and {len(problems) - limit} more differences"]
    return problems
