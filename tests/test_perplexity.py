"""The perplexity evaluator against a direct computation written here, on a tiny Llama."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from merger import evaluate  # noqa: E402
from merger.errors import EvaluationError  # noqa: E402
from merger.evaluate import Candidate, PerplexityEvaluator  # noqa: E402
from merger.plan import build_plan  # noqa: E402
from merger.recipe import validate  # noqa: E402
from merger.soup import subset_plan  # noqa: E402

TEXT = "the train leaves at nine from oakford and stops in riverside on monday . rain is expected on monday"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """Two random tiny Llamas with a word-level tokenizer (BOS prepended), each over two shards."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("tiny")
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *sorted(set(TEXT.split()))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    paths = {}
    for name in ("m1", "m2"):
        model = LlamaForCausalLM(config).eval()
        model.save_pretrained(root / name, max_shard_size="10KB")
        tokenizer.save_pretrained(root / name)
        paths[name] = root / name
    assert len(json.loads((root / "m1" / "model.safetensors.index.json").read_text())["weight_map"]) > 1
    return paths


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def setup(paths: dict, data: Path, **settings) -> tuple[PerplexityEvaluator, object]:
    spec = validate(
        {
            "merge_method": "greedy_soup",
            "models": [{"model": str(paths["m1"])}, {"model": str(paths["m2"])}],
            "evaluation": {"evaluator": "perplexity", "data": str(data), **settings},
        }
    )
    plan = build_plan(spec, device="cpu")
    return PerplexityEvaluator(spec.recipe.evaluation, plan), plan


def reference_nll(model, ids: list[int], max_length: int, stride: int) -> tuple[float, int]:
    """Summed NLL of tokens 1..n-1, each predicted from its own context: the tokens since the start of
    the first window (windows start every `stride` tokens, hold `max_length`) that reaches past it."""
    total = 0.0
    for t in range(1, len(ids)):
        k = max(0, math.ceil((t - max_length + 1) / stride))  # the first window with k*stride + max_length > t
        context = torch.tensor(ids[k * stride : t + 1])
        with torch.no_grad():
            logits = model(input_ids=context[None]).logits[0, -2].double()
        total -= float(torch.log_softmax(logits, -1)[ids[t]])
    return total, len(ids) - 1


def load(path: Path, state: dict | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()
    if state is not None:
        model.load_state_dict(state)
    return model, AutoTokenizer.from_pretrained(path, local_files_only=True)


@pytest.mark.parametrize(("max_length", "stride"), [(32, 16), (8, 3)])  # one window, then many
def test_perplexity_matches_a_direct_computation(tiny, tmp_path, max_length, stride):
    data = tmp_path / "heldout.txt"
    data.write_text(TEXT)
    evaluator, plan = setup(tiny, data, max_length=max_length, stride=stride)
    with Candidate(subset_plan(plan, (0,))) as candidate:
        got = evaluator.score(candidate)

    model, tokenizer = load(tiny["m1"])
    ids = tokenizer(TEXT)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and 16 < len(ids) <= 32
    if max_length >= len(ids):  # one window: the model's own loss over the whole text
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss
        assert got == pytest.approx(math.exp(float(loss)), rel=1e-5)
    nll, n = reference_nll(model, ids, max_length, stride)
    assert got == pytest.approx(math.exp(nll / n), rel=1e-5)


def test_soup_in_memory_and_from_disk_agree(tiny, tmp_path, monkeypatch):
    data = tmp_path / "heldout.txt"
    data.write_text(TEXT)
    evaluator, plan = setup(tiny, data, max_length=8, stride=4)
    assert evaluator.in_memory
    with Candidate(subset_plan(plan, (0, 1))) as candidate:
        in_memory = evaluator.score(candidate)
        assert candidate._tmp is None  # nothing was written

    monkeypatch.setattr(evaluate, "FIT_FRACTION", 0.0)  # "does not fit": write, then load with device_map
    evaluator, plan = setup(tiny, data, max_length=8, stride=4)
    assert not evaluator.in_memory
    with Candidate(subset_plan(plan, (0, 1)), workdir=tmp_path) as candidate:
        from_disk = evaluator.score(candidate)
        written = candidate.path
        assert written.is_relative_to(tmp_path)
    assert not written.parent.exists()
    assert from_disk == pytest.approx(in_memory, rel=1e-6)

    m1, m2 = (load(tiny[n])[0].state_dict() for n in ("m1", "m2"))
    model, tokenizer = load(tiny["m1"], {k: (m1[k] + m2[k]) / 2 for k in m1})
    nll, n = reference_nll(model, tokenizer(TEXT)["input_ids"], 8, 4)
    assert in_memory == pytest.approx(math.exp(nll / n), rel=1e-5)


def test_jsonl_scores_each_record_as_a_document(tiny, tmp_path):
    docs = ["the train leaves at nine", "rain is expected on monday in riverside"]
    data = tmp_path / "heldout.jsonl"
    data.write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(docs)) + "\n")
    evaluator, plan = setup(tiny, data, text_field="body", max_length=8, stride=4)
    with Candidate(subset_plan(plan, (1,))) as candidate:
        got = evaluator.score(candidate)
    model, tokenizer = load(tiny["m2"])
    parts = [reference_nll(model, tokenizer(d)["input_ids"], 8, 4) for d in docs]
    assert got == pytest.approx(math.exp(sum(p[0] for p in parts) / sum(p[1] for p in parts)), rel=1e-5)


def test_bad_data_and_settings(tiny, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "the train"}\n{"body": "rain"}\n')
    with pytest.raises(
        EvaluationError, match=rf"evaluation.data: {bad}:2: no 'text' string \(set evaluation.text_field\)"
    ):
        setup(tiny, bad)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(EvaluationError, match=f"evaluation.data: '{empty}' holds no token to score"):
        setup(tiny, empty)
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    with pytest.raises(
        EvaluationError, match=r"evaluation.max_length: 64 is more than the model's max_position_embeddings \(32\)"
    ):
        setup(tiny, text, max_length=64)
    evaluator, _ = setup(tiny, text)  # defaults: the model's 32 tokens, stride 16
    assert (evaluator.max_length, evaluator.stride) == (32, 16)


class _Planted:
    """A pickle that creates a file when it is loaded: what a stranger's pytorch_model.bin could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_the_evaluator_loads_safetensors_only(tiny, tmp_path):
    """A pickled checkpoint beside the safetensors (or instead of them) is never loaded: the evaluator
    reads merger's own copies and links, and asks transformers for safetensors alone."""
    import pickle
    import shutil

    marker = tmp_path / "pickle-ran"
    paths = {n: tmp_path / n for n in ("m1", "m2")}
    for n, p in paths.items():
        shutil.copytree(tiny[n], p)
        with open(p / "pytorch_model.bin", "wb") as f:
            pickle.dump(_Planted(marker), f)
    data = tmp_path / "heldout.txt"
    data.write_text(TEXT)
    evaluator, plan = setup(paths, data, max_length=8, stride=4)
    with Candidate(subset_plan(plan, (0, 1)), workdir=tmp_path) as candidate:
        evaluator.score(candidate)
    evaluator.close()
    only_pickle = tmp_path / "only-pickle"
    only_pickle.mkdir()
    shutil.copy(paths["m1"] / "config.json", only_pickle)
    shutil.copy(paths["m1"] / "pytorch_model.bin", only_pickle)
    with pytest.raises(OSError):
        evaluator._load(only_pickle)
    assert not marker.exists()
