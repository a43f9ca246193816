"""The demo family: sharded checkpoints on disk, and the designed greedy-soup property."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from merger import demo  # noqa: E402


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One build shared by the tests below: it is the slow part (~25 s)."""
    return demo.build_demo(tmp_path_factory.mktemp("demo"), n_finetunes=4, seed=0)


@pytest.fixture
def one_thread():
    """Evaluate on one thread: as fast for so small a model, and far faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a sharded checkpoint, read through its index with safetensors alone."""
    from safetensors.torch import load_file

    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        out |= load_file(model_dir / shard)
    assert set(out) == set(index["weight_map"])
    return out


def test_layout(built: dict) -> None:
    assert [p.name for p in built["finetunes"]] == ["ft-1", "ft-2", "ft-3", "ft-4"]
    assert built["bad"] == [built["root"] / "ft-4"]
    for model_dir in [built["base"], *built["finetunes"]]:
        index = json.loads((model_dir / "model.safetensors.index.json").read_text())
        shards = set(index["weight_map"].values())
        assert len(shards) >= 2
        assert all((model_dir / s).is_file() for s in shards)
        assert not (model_dir / "model.safetensors").exists()
        for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
            assert (model_dir / name).is_file(), name
        config = json.loads((model_dir / "config.json").read_text())
        assert config["model_type"] == "llama" and config["tie_word_embeddings"] is False
    lines = built["heldout_jsonl"].read_text().splitlines()
    assert [json.loads(line)["text"] for line in lines] == built["heldout"].read_text().splitlines()


def test_greedy_soup_picks_a_proper_subset(built: dict, one_thread: None) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(built["base"], local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(built["base"], local_files_only=True)
    text = built["heldout"].read_text()
    states = {p.name: _state_dict(p) for p in built["finetunes"]}

    def ppl(names: list[str]) -> float:
        """Held-out perplexity of the uniform average of the named fine-tunes."""
        model.load_state_dict({k: sum(states[n][k] for n in names) / len(names) for k in states[names[0]]})
        return demo.perplexity(model, tokenizer, text)

    base = demo.perplexity(model, tokenizer, text)
    single = {name: ppl([name]) for name in states}
    good = [p.name for p in built["good"]]
    assert all(math.isfinite(v) for v in [base, *single.values()])
    assert min(single.values()) < base  # fine-tuning helps...
    assert single["ft-4"] > max(single[n] for n in good)  # ...except for the bad ingredient

    # Greedy soup (Wortsman et al. 2022): best first, keep an ingredient only if it does not hurt.
    order = sorted(single, key=single.get)
    soup, best = [order[0]], single[order[0]]
    for name in order[1:]:
        if (score := ppl([*soup, name])) <= best:
            soup, best = [*soup, name], score
    assert set(soup) < set(states)
    assert "ft-4" not in soup and len(soup) >= 2  # several good fine-tunes combine
    assert ppl(list(states)) > best  # the uniform average of all is worse


def test_check_base(built: dict, one_thread: None, capsys: pytest.CaptureFixture[str]) -> None:
    report = demo.check(built["base"], built["heldout"])
    assert report["dtype"] == "float32"
    assert report["parameters"] == sum(t.numel() for t in _state_dict(built["base"]).values())
    assert 1 < report["perplexity"] < 512  # better than uniform guessing over the vocabulary
    assert isinstance(report["generated"], str) and report["generated"].strip()

    assert demo.main(["check", str(built["base"])]) == 0
    out = capsys.readouterr().out
    assert "parameters" in out and "generation" in out and "perplexity" not in out


def test_needs_a_bad_ingredient(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        demo.build_demo(tmp_path, n_finetunes=1)


def test_greedy_soup_recipe(built: dict, one_thread: None, tmp_path: Path) -> None:
    """`merger apply` with the perplexity evaluator finds the designed subset, and the model it writes
    scores what the search said (`check` computes perplexity its own way)."""
    from click.testing import CliRunner

    from merger.cli import cli

    heldout = tmp_path / "heldout.txt"  # a quarter of the held-out text keeps the test short
    heldout.write_text("\n".join(built["heldout"].read_text().splitlines()[:20]) + "\n")
    models = "".join(f"  - model: {p}\n" for p in built["finetunes"])
    recipe = tmp_path / "greedy.yaml"
    recipe.write_text(
        f"merge_method: greedy_soup\nmodels:\n{models}evaluation:\n  evaluator: perplexity\n"
        f"  data: {heldout}\n  max_length: {demo.SEQ_LEN}\n  stride: {demo.EVAL_STRIDE}\n"
    )
    result = CliRunner().invoke(cli, ["apply", str(recipe), "-o", str(tmp_path / "soup"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)["greedy_soup"]
    names = [Path(m).name for m in report["selected"]]
    assert names[0] == "ft-1" and sorted(names) == ["ft-1", "ft-2", "ft-3"]
    assert [c["accepted"] for c in report["candidates"]] == [True, True, False]
    best_single = report["ingredients"][0]["score"]
    assert report["score"] < best_single / 2 and report["uniform_soup"]["score"] > best_single
    assert demo.check(tmp_path / "soup", heldout)["perplexity"] == pytest.approx(report["score"], rel=1e-5)
