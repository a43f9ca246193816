"""Vocabularies: what mergekit's `tokenizer_source` and `tokenizer:` section do to a merge.

When a recipe names a tokenizer source (base, a model, or `union`), the output's vocabulary is that
tokenizer's, or the union of every model's (the base's tokens first, at their ids; then the tokens the
others add, models in the recipe's order), and each model's vocabulary tensors (the embeddings, the head:
the tensors outside the layers whose first dimension is the model's vocab_size) are laid out in it before
the merge: a model's row for each token it has, and for a token it lacks a stand-in row, as mergekit
picks it (the recipe's `tokens:` setting; else the one model that has it; else the base's row; else the
mean of the rows of the models that have it; zero where none has it). Rows past the tokens
(pad_to_multiple_of) hold the mean of the token rows. Tokens are read from each model's tokenizer.json
(the `tokenizers` library), rows from config.json's vocab_size.

Where every model has the output's tokens at the same rows and no more rows, nothing changes: the merge
reads the tensors as stored.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from tokenizers import AddedToken, Tokenizer

from merger import chat
from merger.errors import ModelError
from merger.layers import find_stacks, stack_of
from merger.recipe import MergeSpec, ModelToken, TokenSetting, ZeroToken
from merger.sources import TOKENIZER_FILES, LocalModel, TensorInfo, read_config, read_support, to_torch

T = TypeVar("T")
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_FILES = ("chat_template.jinja", TOKENIZER_CONFIG, "chat_template.json")  # where a model's chat template is


# transformers reads a sentencepiece or vocab.txt tokenizer (with sentencepiece installed) and writes tokenizer.json
CONVERT = (
    "python -c 'import sys; from transformers import AutoTokenizer as T; "
    "T.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[1])' {path}"
)


class TokenSettingError(ModelError):
    """A `tokens:` setting that the models cannot give (its model lacks the token)."""

    def __init__(self, token: str, message: str):
        super().__init__(message)
        self.token = token


class NoVocabulary(ModelError):
    """A model's tokenizer files do not give its vocabulary (no tokenizer.json beside its other tokenizer
    files, or one that cannot be read)."""


@dataclass(frozen=True)
class ModelVocab:
    """One model's vocabulary: its tokens by id (those below `size`), which of them are added tokens."""

    ids: dict[str, int]
    added: dict[str, AddedToken]  # by content
    size: int  # rows of its vocabulary tensors: config.json's vocab_size
    total: int  # tokens its tokenizer holds, those at or past `size` too


@dataclass(frozen=True)
class StandIn:
    """The row a token's embedding takes in a model that lacks it (or in every model, `force`): the rows
    of `donors` (model path, row) averaged; none: zero."""

    donors: tuple[tuple[Path, int], ...]
    force: bool = False


@dataclass
class Vocabulary:
    """The output's vocabulary and how each model's vocabulary tensors are laid out in it."""

    tokens: list[str]  # the output's, by id
    rows: int  # of the output's vocabulary tensors: the tokens, padded to pad_to_multiple_of
    maps: dict[Path, np.ndarray]  # per model path: its row of each output token, -1 where it lacks it
    settings: dict[int, StandIn]  # the recipe's `tokens:`, by output id
    tensors: frozenset[str]  # the vocabulary tensors' names
    added: list[AddedToken]  # what the output tokenizer adds to its source's (a union's, the recipe's tokens)
    base: Path | None  # the base's path: its row first, for a token some models of a tensor lack
    sizes: dict[Path, int]  # per model path: its vocabulary tensors' rows as stored

    def digest(self) -> str:
        """What the laid-out tensors depend on, as a hash (a resumed output must have been laid out alike)."""
        data = {
            "tokens": self.tokens,
            "rows": self.rows,
            "maps": {str(p): m.tolist() for p, m in self.maps.items()},
            "settings": {row: [[[str(p), r] for p, r in s.donors], s.force] for row, s in self.settings.items()},
            "tensors": sorted(self.tensors),
            "base": str(self.base),
        }
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    def shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Tensor `name`'s shape in the output, given its shape as stored."""
        return (self.rows, *shape[1:]) if name in self.tensors else shape

    def lay_out(self, views: dict[Path, tuple[np.ndarray, str]]) -> dict[Path, np.ndarray]:
        """Each model's vocabulary tensor (`views`: as stored, with its dtype code, by model path) laid out
        in the output's vocabulary: new arrays of `rows` rows, in the stored dtype."""
        n = len(self.tokens)
        present = {p: self.maps[p] >= 0 for p in views}
        out = {}
        for path, (view, _) in views.items():
            new = np.zeros((self.rows, *view.shape[1:]), dtype=view.dtype)
            have = np.flatnonzero(present[path])
            new[have] = view[self.maps[path][have]]
            out[path] = new
        for row, s in self._stand_ins(present).items():  # slices of one row: a 1-D tensor's row is a view too
            donors = [(views[p][0][r : r + 1], views[p][1]) for p, r in s.donors]
            for path, (_, code) in views.items():
                if s.force or not present[path][row]:
                    _set_row(out[path][row : row + 1], code, donors)
        if self.rows > n:  # the padding: each model's mean token row (mergekit's choice)
            for path, (_, code) in views.items():
                _set_row(out[path][n:], code, [(out[path][:n], code)], mean_of_rows=True)
        return out

    def _stand_ins(self, present: dict[Path, np.ndarray]) -> dict[int, StandIn]:
        """What each row some model lacks (or the recipe forces) takes, as mergekit's PermutedVocabulary
        picks it among the models of this tensor."""
        paths = list(present)
        have = np.stack([present[p] for p in paths]) if paths else np.zeros((0, len(self.tokens)), bool)
        count = have.sum(axis=0)
        out: dict[int, StandIn] = {row: s for row, s in self.settings.items() if s.force or count[row] < len(paths)}
        for row in np.flatnonzero(count < len(paths)).tolist():
            if row in out:
                continue
            holders = [p for p, h in zip(paths, have[:, row]) if h]
            if len(holders) > 1 and self.base in holders:
                holders = [self.base]
            out[row] = StandIn(tuple((p, int(self.maps[p][row])) for p in holders))
        return out


def _set_row(dst: np.ndarray, code: str, donors: list[tuple[np.ndarray, str]], mean_of_rows: bool = False) -> None:
    """dst (stored values of dtype `code`) set to the mean of the donors' rows (each with its dtype code),
    computed in float64 and rounded once; to a lone donor's bytes where it has dst's dtype; zero for none.
    mean_of_rows: the one donor is a matrix, whose rows' mean fills every row of dst."""
    if not donors:
        dst[...] = 0
        return
    if len(donors) == 1 and donors[0][1] == code and not mean_of_rows:
        dst[...] = donors[0][0]
        return
    if mean_of_rows:
        mean = _mean_of_rows(*donors[0])
    else:
        values = [to_torch(np.ascontiguousarray(row), c).double() for row, c in donors]
        mean = sum(values[1:], values[0]) / len(values)
    to_torch(dst, code).copy_(mean.expand(dst.shape))


def _mean_of_rows(a: np.ndarray, code: str, block: int = 1024):
    """The mean row of `a` (stored values of dtype `code`) in float64, summed a block of rows at a time: a
    float64 copy of a whole embedding would be four times its size."""
    total = None
    for start in range(0, len(a), block):
        part = to_torch(a[start : start + block], code).double().sum(dim=0)
        total = part if total is None else total + part
    return total / len(a)


# --- reading ---


def _fetched(model: LocalModel, name: str) -> bool:
    """Whether `model` holds file `name`, fetched first for a Hub model (a tokenizer file: small)."""
    if not model.has(name):
        return False
    if model.remote is not None:
        model.remote.fetch(name)
    return True


def read_chat_template(model: LocalModel) -> str | None:
    """The chat template `model`'s tokenizer files hold (merger.chat.model_template), None if none."""
    files: dict[str, object] = {}
    for name in CHAT_FILES:
        if _fetched(model, name):
            raw, parsed = read_support(model, name)
            files[name] = parsed if name.endswith(".json") else _text(raw, model, name)
    return chat.model_template(files)


def _text(raw: bytes, model: LocalModel, name: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise NoVocabulary(f"'{model.ref}': {name} is not UTF-8 text") from None


def read_vocab(model: LocalModel) -> ModelVocab | None:
    """`model`'s vocabulary from its tokenizer.json and config.json; None where it holds no tokenizer
    files (mergekit then takes its vocabulary to be the base's)."""
    if not _fetched(model, TOKENIZER_JSON):
        held = sorted((name for name in TOKENIZER_FILES if model.has(name)), key=lambda n: n.endswith(".json"))
        if held:
            raise NoVocabulary(
                f"'{model.ref}': holds {held[0]} but no tokenizer.json, which merger reads vocabularies from "
                f"(write one: {CONVERT.format(path=shlex.quote(str(model.path)))})"
            )
        return None
    vocab, added_by_id = _read_tokenizer(model, _tokens_of)
    size = _config_vocab_size(model) or len(vocab)
    added = {t.content: t for i, t in added_by_id.items() if i < size}
    return ModelVocab({tok: i for tok, i in vocab.items() if i < size}, added, size, len(vocab))


@functools.lru_cache(maxsize=2)
def _tokens_of(text: str) -> tuple[dict[str, int], dict[int, AddedToken]]:
    """A tokenizer.json's tokens by id and its added tokens, parsed once for every model that holds the same
    file (fine-tunes mostly keep their base's; a large vocabulary takes most of a second to parse). Read only."""
    tokenizer = Tokenizer.from_str(text)
    return tokenizer.get_vocab(with_added_tokens=True), tokenizer.get_added_tokens_decoder()


def _config_vocab_size(model: LocalModel) -> int | None:
    _fetched(model, "config.json")
    return vocab_size(read_config(model) or {})


def _read_tokenizer(model: LocalModel, parse: Callable[[str], T]) -> T:
    """`parse` of `model`'s tokenizer.json text; NoVocabulary where the tokenizers library cannot read it."""
    text = _text(read_support(model, TOKENIZER_JSON)[0], model, TOKENIZER_JSON)
    try:
        return parse(text)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # the tokenizers library raises plain Exceptions, and a Rust panic a BaseException
        line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise NoVocabulary(f"'{model.ref}': tokenizer.json cannot be read: {line}") from None


def vocab_size(config: dict) -> int | None:
    """config.json's vocab_size (a multimodal model's in its text_config), if it gives a positive one."""
    for holder in (config, config.get("text_config")):
        if isinstance(holder, dict):
            value = holder.get("vocab_size")
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


# --- planning ---


def plan_vocabulary(
    spec: MergeSpec,
    opened: dict[str, LocalModel],
    models: list[LocalModel],
    base: LocalModel | None,
    reference: LocalModel,
    notes: list[str],
) -> Vocabulary | None:
    """The output's vocabulary (spec.vocabulary: its source, tokens and padding) over the recipe's models
    (`models`, in its order; `opened`: by reference), or None where it changes nothing. ModelError for a model whose files cannot
    give it (NoVocabulary: the source's, or the base's); what is taken instead of another model's unreadable
    vocabulary goes to `notes`."""
    setting = spec.vocabulary
    assert setting is not None
    first = base or reference
    source = first if setting.source in ("union", "base") else opened[setting.source]
    vocabs = _read_vocabs({m.path: m for m in models}, first, source, notes)
    tokens = _tokens(vocabs[source.path], source)
    added = _union_additions(tokens, list(vocabs.values())) if setting.source == "union" else []
    added += [
        AddedToken(t, normalized=True) for t in setting.tokens or {} if t not in {*tokens, *(a.content for a in added)}
    ]
    if added and vocabs[source.path].total != len(tokens):
        raise ModelError(
            f"'{source.ref}': its tokenizer holds {vocabs[source.path].total - len(tokens)} token(s) past its "
            f"vocab_size {vocabs[source.path].size}; merger cannot add tokens after them"
        )
    tokens += [t.content for t in added]
    pad = setting.pad_to_multiple_of or 1
    rows = -(-len(tokens) // pad) * pad
    maps = {p: _map(tokens, v) for p, v in vocabs.items()}
    index = {tok: i for i, tok in enumerate(tokens)}
    settings = {index[tok]: _stand_in(s, tok, opened, vocabs) for tok, s in (setting.tokens or {}).items()}
    sizes = {p: v.size for p, v in vocabs.items()}
    if (
        not settings
        and not added
        and all(n == rows and np.array_equal(maps[p], np.arange(rows)) for p, n in sizes.items())
    ):
        return None
    names = vocabulary_tensors(reference, sizes[reference.path])
    if not names:
        raise ModelError(
            f"'{reference.ref}': no tensor outside its layers has its vocab_size ({sizes[reference.path]}) "
            "rows, so merger cannot tell its vocabulary tensors"
        )
    for m in models:
        _check_rows(m, names, sizes[m.path], reference)
    return Vocabulary(tokens, rows, maps, settings, frozenset(names), added, base.path if base else None, sizes)


def _read_vocabs(
    models: dict[Path, LocalModel], first: LocalModel, source: LocalModel, notes: list[str]
) -> dict[Path, ModelVocab]:
    """Every model's vocabulary. As in mergekit, a model without tokenizer files has the base's (else the
    first model's), cut at its own vocab_size, with a note; the base's and the source's must be read.
    NoVocabulary for a model whose tokenizer files give none (mergekit reads a sentencepiece model, which
    merger cannot: its tokens would be left out)."""
    read = {path: read_vocab(model) for path, model in models.items()}
    for path in (first.path, source.path):
        if read[path] is None:
            raise NoVocabulary(
                f"'{models[path].ref}': holds no tokenizer files, which the output's vocabulary is read from"
            )
    for path, v in read.items():
        if v is None:
            notes.append(
                f"'{models[path].ref}' holds no tokenizer files: taken to have the vocabulary of '{first.ref}', as mergekit does"
            )
    return {path: v or _with_size(read[first.path], models[path]) for path, v in read.items()}


def _with_size(vocab: ModelVocab, model: LocalModel) -> ModelVocab:
    """The base's vocabulary as a model without a tokenizer has it: cut at its own vocab_size."""
    size = _config_vocab_size(model) or vocab.size
    return ModelVocab({t: i for t, i in vocab.ids.items() if i < size}, vocab.added, size, vocab.total)


def _tokens(vocab: ModelVocab, model: LocalModel) -> list[str]:
    """The tokens of the vocabulary the output starts from, by id: ids 0 to n-1, each once."""
    by_id = sorted(vocab.ids.items(), key=lambda kv: kv[1])
    ids = [i for _, i in by_id]
    if len(set(ids)) != len(ids):
        twice = next(i for i, j in zip(ids, ids[1:]) if i == j)
        raise ModelError(f"'{model.ref}': its tokenizer.json gives id {twice} to two tokens")
    if ids != list(range(len(ids))):
        gap = next(i for i, j in enumerate(ids) if i != j)
        raise ModelError(
            f"'{model.ref}': its tokenizer.json has no token of id {gap} below its vocab_size {vocab.size}; "
            "merger builds an output vocabulary only from one whose ids run from 0 without a gap"
        )
    return [tok for tok, _ in by_id]


def _union_additions(tokens: list[str], vocabs: list[ModelVocab]) -> list[AddedToken]:
    """The tokens a union adds to the base's `tokens`, as mergekit's build_union_tokenizer: first each
    model's plain tokens the base lacks, then the added tokens (their settings from the first model
    that adds them); models in order, each one's tokens by id."""
    have = set(tokens)
    added_anywhere: dict[str, AddedToken] = {}
    for v in vocabs:
        for content, t in v.added.items():
            added_anywhere.setdefault(content, t)
    out: list[AddedToken] = []
    for v in vocabs:
        for tok, _ in sorted(v.ids.items(), key=lambda kv: kv[1]):
            if tok not in have and tok not in added_anywhere:
                have.add(tok)
                out.append(AddedToken(tok, normalized=True))
    for content, t in added_anywhere.items():
        if content not in have:
            have.add(content)
            out.append(t)
    return out


def _map(tokens: list[str], vocab: ModelVocab) -> np.ndarray:
    return np.array([vocab.ids.get(tok, -1) for tok in tokens], dtype=np.int64)


def _stand_in(s: TokenSetting, token: str, opened: dict[str, LocalModel], vocabs: dict[Path, ModelVocab]) -> StandIn:
    """The recipe's setting for `token` (checked by the recipe: its models are the recipe's)."""
    src = s.source
    if isinstance(src, ZeroToken):
        return StandIn((), s.force)
    model = opened[src.model]
    vocab = vocabs[model.path]
    if isinstance(src, ModelToken) and src.token_id is not None:
        row = src.token_id
        if row >= vocab.size:
            raise TokenSettingError(token, f"token id {row} is past the vocab_size of '{src.model}' ({vocab.size})")
    else:
        name = src.token if isinstance(src, ModelToken) else token
        if name not in vocab.ids:
            raise TokenSettingError(token, f"'{src.model}' has no token {name!r}")
        row = vocab.ids[name]
    return StandIn(((model.path, row),), s.force)


# Position embeddings, named as checkpoints name them (GPT-2's wpe, BERT's position_embeddings, OPT's
# embed_positions): a row per position, however many there are
POSITIONS = re.compile(r"(^|[._])(wpe|pos_embed\w*|position\w*|embed_positions)([._]|$)", re.IGNORECASE)


def vocabulary_tensors(model: LocalModel, size: int) -> list[str]:
    """The float tensors outside the layers whose first dimension is the vocabulary: matrices (token
    embeddings, head), and vectors beside one of them in its module (a head's bias; a norm of a hidden
    size that happens to equal the vocabulary's is not one); never position embeddings (POSITIONS)."""
    stacks = find_stacks(model.tensors)
    rows = [
        (name, len(info.shape))
        for name, info in model.tensors.items()
        if info.is_float
        and info.shape
        and info.shape[0] == size
        and stack_of(stacks, name) is None
        and not POSITIONS.search(name)
    ]
    modules = {name.rpartition(".")[0] for name, ndim in rows if ndim >= 2}
    return [name for name, ndim in rows if ndim >= 2 or name.rpartition(".")[0] in modules]


def lays_out(vocabulary: Vocabulary | None, name: str) -> bool:
    """Whether tensor `name` is laid out in the output's vocabulary before the merge (new rows, new arrays)."""
    return vocabulary is not None and name in vocabulary.tensors


def fits(vocabulary: Vocabulary | None, name: str, shape: tuple[int, ...], like: tuple[int, ...]) -> bool:
    """Whether a model's tensor `name` of `shape` merges with another's of shape `like`: the same shape,
    or for a vocabulary tensor (laid out in the output's vocabulary first) the same but in its rows."""
    return shape[1:] == like[1:] and (lays_out(vocabulary, name) or shape == like)


def _check_rows(model: LocalModel, names: list[str], size: int, reference: LocalModel) -> None:
    for name in names:
        info: TensorInfo | None = model.tensors.get(name)
        if info is not None and (not info.shape or info.shape[0] != size):
            raise ModelError(
                f"'{model.ref}': tensor '{name}' has {info.shape[0] if info.shape else 0} rows, but its config.json "
                f"gives vocab_size: {size}; a vocabulary tensor (as '{name}' is in '{reference.ref}') has a row "
                "per token, so this model's weights and config disagree"
            )


# --- the output's tokenizer ---


def tokenizer_files(vocabulary: Vocabulary, source: LocalModel) -> dict[str, bytes]:
    """The tokenizer files that differ from the source's: tokenizer.json with the added tokens, and
    tokenizer_config.json's added_tokens_decoder with them (what transformers writes)."""
    if not vocabulary.added:
        return {}
    tokenizer = _read_tokenizer(source, Tokenizer.from_str)  # a tokenizer of its own, to add to
    start = tokenizer.get_vocab_size(with_added_tokens=True)
    for special, run in itertools.groupby(vocabulary.added, key=lambda t: t.special):  # in order, a run a call
        (tokenizer.add_special_tokens if special else tokenizer.add_tokens)(list(run))
    got = tokenizer.get_vocab(with_added_tokens=True)
    if [got.get(t.content) for t in vocabulary.added] != list(range(start, start + len(vocabulary.added))):
        raise ModelError(f"'{source.ref}': its tokenizer.json did not take the added tokens at ids {start} on")
    out = {TOKENIZER_JSON: tokenizer.to_str(pretty=True).encode()}
    config = tokenizer_config(source)
    if isinstance(config.get("added_tokens_decoder"), dict):
        for i, t in enumerate(vocabulary.added, start):
            config["added_tokens_decoder"][str(i)] = _decoder_entry(t)
        out[TOKENIZER_CONFIG] = (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode()
    return out


def tokenizer_changes(
    vocabulary: Vocabulary | None, source: LocalModel, template: str | None
) -> tuple[dict[str, bytes], frozenset[str]]:
    """(the tokenizer files the output gets other than the source's, by name; the source's it does not
    get): a vocabulary's added tokens (tokenizer_files), the recipe's chat template in tokenizer_config.json,
    where no chat_template file of the source's then overrides it. Made when the merge is planned, so that
    a file that cannot take them stops it before any tensor is read."""
    made = tokenizer_files(vocabulary, source) if vocabulary is not None else {}
    if template is None:
        return made, frozenset()
    made[TOKENIZER_CONFIG] = with_chat_template(made.get(TOKENIZER_CONFIG), source, template)
    return made, frozenset({"chat_template.jinja", "chat_template.json"})


def with_chat_template(made: bytes | None, source: LocalModel, template: str) -> bytes:
    """tokenizer_config.json (`made`, else the source's, else a new one) with `template` as its chat template."""
    config = json.loads(made) if made is not None else tokenizer_config(source)
    config["chat_template"] = template
    return (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode()


def tokenizer_config(model: LocalModel) -> dict:
    """`model`'s tokenizer_config.json, {} where it holds none; ModelError where it is not a JSON object."""
    if not _fetched(model, TOKENIZER_CONFIG):
        return {}
    config = read_support(model, TOKENIZER_CONFIG)[1]
    if not isinstance(config, dict):
        raise ModelError(f"'{model.ref}': tokenizer_config.json is not a JSON object")
    return config


def _decoder_entry(t: AddedToken) -> dict:
    return {
        "content": t.content,
        "lstrip": t.lstrip,
        "normalized": t.normalized,
        "rstrip": t.rstrip,
        "single_word": t.single_word,
        "special": t.special,
    }


def set_vocab_size(config: dict, rows: int) -> None:
    """config.json's vocab_size set to `rows` wherever it gives one (top level, text_config: a multimodal
    config may give both, and transformers reads text_config's); at the top level where it gives none."""
    holders = [h for h in (config, config.get("text_config")) if isinstance(h, dict) and "vocab_size" in h]
    for holder in holders or [config]:
        holder["vocab_size"] = rows
