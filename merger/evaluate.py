"""Held-out evaluators for greedy soup: perplexity (transformers), a shell command, a Python function.

An evaluator scores a `Candidate`, one soup whose weights the streaming engine produces on demand:
into a temporary model directory (`candidate.path`), straight into a loaded model's parameters
(`candidate.load_into(model)`), or into a dict (`candidate.state_dict()`).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import importlib
import json
import math
import numbers
import os
import shlex
import shutil
import subprocess
import sys
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import torch

from merger import staging, system
from merger.apply import apply
from merger.errors import EvaluationError, MergerError
from merger.files import sha256_file
from merger.output import copy_support_files
from merger.plan import Plan
from merger.recipe import CommandEvaluation, PerplexityEvaluation, PythonEvaluation
from merger.sources import INDEX_NAME
from merger.stream import merge_tensors

FIT_FRACTION = 0.8  # in-memory evaluation when the model takes at most this much of the free memory


def available_memory(device: str) -> int:
    """Bytes free for a new allocation: free GPU memory on CUDA, else the kernel's MemAvailable."""
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    available = system.mem_available()
    return available if available is not None else os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class Candidate:
    """One soup under evaluation: the uniform soup of `models`, built by the streaming engine.

    Use it as a context manager: `close()` removes the directory `path` wrote.
    """

    def __init__(self, plan: Plan, workdir: Path | None = None):
        self.plan = plan
        self.models = [g.ref for g in plan.spec.ingredients]  # recipe references, in recipe order
        self._workdir = workdir  # where `path` creates its temporary directory (None: the system's)
        self._tmp: Path | None = None

    @property
    def label(self) -> str:
        return " + ".join(self.models)

    @property
    def path(self) -> Path:
        """A complete model directory (shards, index, config, tokenizer), written on first access."""
        if self._tmp is None:
            self._tmp, self._held = staging.temporary(self._workdir)
            apply(self.plan, self._tmp / "model", durable=False)
        return self._tmp / "model"

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every merged tensor in memory (CPU, the output dtype)."""
        need, free = self.plan.bytes_written, available_memory("cpu")
        if need > FIT_FRACTION * free:
            raise EvaluationError(
                f"the candidate takes {need / 1e9:.1f} GB, more than fits in memory ({free / 1e9:.1f} GB free); "
                "use candidate.path or candidate.load_into(model)"
            )
        return dict(merge_tensors(self.plan))

    def load_into(self, model: torch.nn.Module) -> None:
        """Copy the merged tensors into `model`'s parameters and buffers one at a time (extra memory: one
        tensor). Every tensor must have a place in `model.state_dict()`; a model tensor the candidate lacks
        must share its storage with one it has (tied embeddings)."""
        targets = model.state_dict()
        names = [t.name for t in self.plan.tensors]
        unknown = [n for n in names if n not in targets]
        if unknown:
            raise EvaluationError(f"the model has no tensor '{unknown[0]}' (of {len(unknown)} the candidate holds)")
        loaded = {targets[n].data_ptr() for n in names}
        missing = [n for n in targets if n not in set(names) and targets[n].data_ptr() not in loaded]
        if missing:
            raise EvaluationError(f"the candidate lacks the model's tensor '{missing[0]}'")
        with torch.no_grad():
            for name, tensor in merge_tensors(self.plan):
                targets[name].copy_(tensor)

    def close(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            os.close(self._held)
            self._tmp = None

    def __enter__(self) -> Candidate:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Evaluator(Protocol):
    def settings(self) -> dict:
        """Everything the score depends on besides the weights: part of the cache key."""

    def describe(self) -> str:
        """A few words for the report, e.g. 'perplexity on heldout.txt'."""

    def score(self, candidate: Candidate) -> float: ...

    def close(self) -> None: ...


def make_evaluator(plan: Plan, workdir: Path | None = None) -> Evaluator:
    """The recipe's evaluator, set up and checked (data read, function imported) before any tensor is read."""
    ev = plan.spec.recipe.evaluation
    if isinstance(ev, PerplexityEvaluation):
        return PerplexityEvaluator(ev, plan, workdir)
    if isinstance(ev, CommandEvaluation):
        return CommandEvaluator(ev, plan)
    if isinstance(ev, PythonEvaluation):
        return PythonEvaluator(ev, plan)
    raise MergerError(f"{plan.spec.where('evaluation')}: {plan.spec.method.name} needs an evaluation section")


# --- perplexity ------------------------------------------------------------------------------------


@torch.no_grad()
def perplexity(model: torch.nn.Module, documents: list[torch.Tensor], max_length: int, stride: int) -> float:
    """exp(mean negative log-likelihood) over every token of every document but the first.

    Each document (1-d token ids) is read in windows of `max_length` tokens starting every `stride`
    (< max_length) tokens; a window scores only the tokens that no earlier window scored, so each token
    is scored once, with between max_length - stride and max_length - 1 tokens of context. Logits are
    cast to float32 and the log-likelihoods summed in float64.
    """
    device = model.get_input_embeddings().weight.device
    if device.type == "meta":  # offloaded by accelerate: its hooks move the inputs
        device = torch.device("cpu")
    nll, count = 0.0, 0
    for ids in documents:
        n, prev_end = ids.numel(), 0
        for begin in range(0, n - 1, stride):
            end = min(begin + max_length, n)
            window = ids[begin:end].to(device)
            logits = model(input_ids=window[None], use_cache=False).logits[0]  # (end - begin, vocab)
            first = max(prev_end, begin + 1)  # the first token not scored yet (it needs one token of context)
            logp = torch.log_softmax(logits[first - begin - 1 : end - begin - 1].float(), dim=-1)
            nll -= float(logp.gather(1, window[first - begin :, None]).sum(dtype=torch.float64))
            count += end - first
            prev_end = end
            if end == n:
                break
    return math.exp(nll / count) if nll / count < 709 else math.inf  # exp overflows a float past ~709.78


def read_documents(path: Path, text_field: str, where: str) -> list[str]:
    """A .jsonl file: one document per line, its text under `text_field`; any other file: one document."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise EvaluationError(f"{where}: cannot read '{path}': {getattr(e, 'strerror', None) or e}") from None
    if path.suffix != ".jsonl":
        return [text]
    docs = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise EvaluationError(f"{where}: {path}:{lineno}: not valid JSON") from None
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise EvaluationError(f"{where}: {path}:{lineno}: no '{text_field}' string (set evaluation.text_field)")
        docs.append(record[text_field])
    return docs


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' warnings and progress bars for a while, then restore the caller's settings."""
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


class PerplexityEvaluator:
    """Perplexity of each candidate as a causal LM, on the plan's device.

    When the model, in the evaluation dtype, takes at most FIT_FRACTION of the free memory on the device,
    one model is loaded (the reference model's weights) and each candidate's merged tensors are
    streamed into its parameters: no file is written. Otherwise each candidate is written to a temporary
    directory and loaded with device_map="auto", which offloads what does not fit.

    transformers never reads an input's folder itself: config, tokenizer and weights come from a private
    directory holding merger's checked copies of the support files and links to the weight files the
    plan checked, and it loads safetensors only (no pickle, no code from the model).
    """

    def __init__(self, ev: PerplexityEvaluation, plan: Plan, workdir: Path | None = None):
        where = plan.spec.where
        try:
            from transformers import AutoConfig, AutoTokenizer
        except ImportError:
            raise EvaluationError(
                f"{where('evaluation', 'evaluator')}: perplexity needs transformers: pip install 'merger[eval]'"
            ) from None
        self.ev, self.plan = ev, plan
        data = Path(ev.data).expanduser()
        self.data_sha256 = hashlib.sha256(data.read_bytes()).hexdigest() if data.is_file() else ""
        docs = read_documents(data, ev.text_field, where("evaluation", "data"))
        # merger's checked copies for transformers, beside the output like a candidate (and removed with
        # the evaluator, or by a later run if this one is killed)
        self.support, held = staging.temporary(workdir)
        weakref.finalize(self, _remove_held, self.support, held)
        _support_dir(plan, self.support)
        with quiet_transformers():
            try:
                config = AutoConfig.from_pretrained(self.support, local_files_only=True, trust_remote_code=False)
                tokenizer = AutoTokenizer.from_pretrained(self.support, local_files_only=True, trust_remote_code=False)
            except (OSError, ValueError) as e:
                raise EvaluationError(
                    f"{where('evaluation')}: cannot load the model's config or tokenizer: {e}"
                ) from None
        limit = getattr(config, "max_position_embeddings", None)
        self.max_length = ev.max_length or min(1024, limit or 1024)
        if limit and self.max_length > limit:
            raise EvaluationError(
                f"{where('evaluation', 'max_length')}: {self.max_length} is more than the model's "
                f"max_position_embeddings ({limit})"
            )
        self.stride = ev.stride or max(1, self.max_length // 2)
        if self.stride >= self.max_length:
            raise EvaluationError(f"{where('evaluation', 'stride')}: must be less than max_length ({self.max_length})")
        self.documents = [
            torch.tensor(tokenizer(d, verbose=False)["input_ids"], dtype=torch.long) for d in docs
        ]  # verbose=False: long documents are windowed, so the length warning is noise
        if sum(max(0, len(ids) - 1) for ids in self.documents) == 0:
            raise EvaluationError(f"{where('evaluation', 'data')}: '{ev.data}' holds no token to score")
        self.dtype = getattr(torch, ev.dtype)
        size = sum(t.numel * self.dtype.itemsize if t.is_float else t.nbytes for t in plan.reference.tensors.values())
        self.in_memory = size <= FIT_FRACTION * available_memory(plan.device)
        self._model: torch.nn.Module | None = None

    def settings(self) -> dict:
        out = {
            "evaluator": "perplexity",
            "data_sha256": self.data_sha256,
            "max_length": self.max_length,
            "stride": self.stride,
            "dtype": self.ev.dtype,
            "device": self.plan.device,
        }
        if Path(self.ev.data).suffix == ".jsonl":
            out["text_field"] = self.ev.text_field
        return out

    def describe(self) -> str:
        return f"perplexity on {self.ev.data}"

    def _load(self, path: Path, **kwargs) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(
                path, local_files_only=True, dtype=self.dtype, use_safetensors=True, trust_remote_code=False, **kwargs
            )
        return model.eval()

    def score(self, candidate: Candidate) -> float:
        if self.in_memory and self._model is None:
            self._model = self._load(self.support).to(self.plan.device)
            names = {t.name for t in self.plan.tensors}
            if not names <= set(self._model.state_dict()):  # a checkpoint transformers renames on load
                self.in_memory, self._model = False, None
        if self.in_memory:
            candidate.load_into(self._model)
            return perplexity(self._model, self.documents, self.max_length, self.stride)
        offload = candidate.path.parent / "offload"
        model = self._load(candidate.path, device_map="auto", offload_folder=str(offload))
        try:
            return perplexity(model, self.documents, self.max_length, self.stride)
        finally:
            del model
            self._free()

    def _free(self) -> None:
        gc.collect()
        if self.plan.device == "cuda":
            torch.cuda.empty_cache()

    def close(self) -> None:
        self._model = None
        self._free()
        shutil.rmtree(self.support, ignore_errors=True)


def _remove_held(directory: Path, fd: int) -> None:
    shutil.rmtree(directory, ignore_errors=True)
    os.close(fd)


def _support_dir(plan: Plan, directory: Path) -> None:
    """What transformers loads the reference model from: the output's support files (config, tokenizer),
    and links to the reference's weight files (and its index) where the plan checked them."""
    copy_support_files(plan, directory)
    ref = plan.reference
    for f in ref.files:
        name = ref.name_of(f)
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).symlink_to(ref.folder.locate(name))
    if ref.folder.has(INDEX_NAME):
        (directory / INDEX_NAME).write_bytes(ref.folder.read_bytes(INDEX_NAME))


# --- command ---------------------------------------------------------------------------------------


def parse_score(stdout: str, json_field: str | None) -> float:
    """The number on the last non-empty line of `stdout`, or the (dotted) `json_field` of the last JSON
    object printed (the whole output, else the last line that is one). Raises ValueError saying what
    the command printed ("printed no number ...")."""
    lines = [line.strip() for line in stdout.splitlines() if line.strip()]
    if json_field is None:
        if not lines:
            raise ValueError("printed nothing; print the score as the last line of stdout")
        try:
            return float(lines[-1])
        except ValueError:
            raise ValueError(
                f"printed no number on its last line ({lines[-1][:80]!r}); print the score last, or set json_field"
            ) from None
    for chunk in [stdout, *reversed(lines)]:
        try:
            value = json.loads(chunk)
        except json.JSONDecodeError:
            continue
        if not isinstance(value, dict):
            continue
        for key in json_field.split("."):
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ValueError(f"printed JSON whose field '{json_field}' is {value!r}, not a number")
    raise ValueError(f"printed no JSON object (looking for field '{json_field}')")


class CommandEvaluator:
    """A shell command run on each candidate's directory, from the working directory."""

    def __init__(self, ev: CommandEvaluation, plan: Plan):
        self.ev = ev
        self.where = plan.spec.where("evaluation", "command")

    def settings(self) -> dict:
        return {
            "evaluator": "command",
            "command": self.ev.command,
            "json_field": self.ev.json_field,
            "cwd": os.getcwd(),
            "files": self._files(),
        }

    def _files(self) -> dict[str, str]:
        """The sha256 of every file the command names (its script, its data): editing one re-scores."""
        try:
            words = shlex.split(self.ev.command)
        except ValueError:
            return {}
        return {w: sha256_file(Path(w)) for w in words if "{model}" not in w and Path(w).is_file()}

    def describe(self) -> str:
        return f"`{self.ev.command}`"

    def score(self, candidate: Candidate) -> float:
        command = self.ev.command.replace("{model}", shlex.quote(str(candidate.path)))
        try:
            done = system.run_in_group(command, self.ev.timeout)  # ended with its children on timeout or interrupt
        except subprocess.TimeoutExpired:
            raise EvaluationError(f"{self.where}: timed out after {self.ev.timeout:g} s on {candidate.label}") from None
        if done.returncode != 0:
            status = f"exit status {done.returncode}" if done.returncode > 0 else f"signal {-done.returncode}"
            stderr = done.stderr.strip().splitlines()[-20:] or ["(nothing on stderr)"]
            raise EvaluationError(f"{self.where}: failed ({status}) on {candidate.label}:", *stderr)
        try:
            return parse_score(done.stdout, self.ev.json_field)
        except ValueError as e:
            raise EvaluationError(f"{self.where}: on {candidate.label}, it {e}") from None

    def close(self) -> None:
        pass


# --- python ----------------------------------------------------------------------------------------


class PythonEvaluator:
    """`module:function`, called as function(candidate) -> float."""

    def __init__(self, ev: PythonEvaluation, plan: Plan):
        self.ev = ev
        self.where = plan.spec.where("evaluation", "function")
        module_name, _, name = ev.function.partition(":")
        sys.path.insert(0, os.getcwd())  # as `python -m` does
        try:
            module = importlib.import_module(module_name)
        except Exception as e:  # the user's module may raise anything on import
            raise EvaluationError(f"{self.where}: cannot import {module_name}: {type(e).__name__}: {e}") from None
        finally:
            sys.path.remove(os.getcwd())
        self.fn: Callable[[Candidate], float] = getattr(module, name, None)
        if not callable(self.fn):
            raise EvaluationError(f"{self.where}: module {module_name} has no function '{name}'")
        source = getattr(module, "__file__", None)
        self.source_sha256 = sha256_file(Path(source)) if source and Path(source).is_file() else None

    def settings(self) -> dict:
        return {"evaluator": "python", "function": self.ev.function, "source_sha256": self.source_sha256}

    def describe(self) -> str:
        return self.ev.function

    def score(self, candidate: Candidate) -> float:
        try:
            value = self.fn(candidate)
        except MergerError:
            raise
        except Exception as e:  # the user's function may raise anything, over several lines too
            first, *rest = str(e).splitlines() or [""]
            raise EvaluationError(
                f"{self.where}: {self.ev.function} raised {type(e).__name__}: {first} (on {candidate.label})", *rest
            ) from e
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise EvaluationError(f"{self.where}: {self.ev.function} returned {value!r}, not a number")
        return float(value)

    def close(self) -> None:
        pass
