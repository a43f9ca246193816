"""Round trips through transformers: merged models load unchanged and compute what the oracle's weights do."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from merger.cli import cli

transformers = pytest.importorskip("transformers")


def tiny_llama(seed: int, tie: bool = False):
    cfg = transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie,
    )  # fmt: skip
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def perturbed(model, seed: int, scale: float = 0.02):
    g = torch.Generator().manual_seed(seed)
    out = type(model)(model.config).eval()
    out.load_state_dict({k: v + scale * torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()})
    return out


def run(tmp_path, recipe: str):
    (tmp_path / "r.yaml").write_text(recipe)
    result = CliRunner().invoke(cli, ["apply", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 0, result.output
    return tmp_path / "out"


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties"])
def test_llama_merge_loads_and_matches_oracle_logits(tmp_path, method):
    base = tiny_llama(0)
    fts = [perturbed(base, s) for s in (1, 2)]
    for name, m in [("base", base), ("ft1", fts[0]), ("ft2", fts[1])]:
        m.save_pretrained(tmp_path / name, max_shard_size="20KB")  # several shards each
    assert (tmp_path / "ft1" / "model.safetensors.index.json").exists()

    extra = ", density: 0.6" if method == "ties" else ""
    out = run(
        tmp_path,
        f"""
merge_method: {method}
base_model: {tmp_path / "base"}
models:
  - model: {tmp_path / "ft1"}
    parameters: {{weight: 0.7{extra}}}
  - model: {tmp_path / "ft2"}
    parameters: {{weight: 0.3{extra}}}
""",
    )

    # the oracle: the same formula on the state dicts, in float64
    sb, s1, s2 = (m.state_dict() for m in (base, *fts))
    oracle = {}
    for k in sb:
        b, x1, x2 = sb[k].double(), s1[k].double(), s2[k].double()
        if method == "linear":
            oracle[k] = 0.7 * x1 + 0.3 * x2
        elif method == "task_arithmetic":
            oracle[k] = b + 0.7 * (x1 - b) + 0.3 * (x2 - b)
        else:
            ds = []
            for x, w in ((x1, 0.7), (x2, 0.3)):
                tv = (x - b).reshape(-1)
                k_keep = max(1, int(0.6 * tv.numel() + 1e-9))
                idx = torch.sort(tv.abs(), descending=True, stable=True).indices[:k_keep]
                t = torch.zeros_like(tv)
                t[idx] = tv[idx]
                ds.append(w * t.reshape(b.shape))
            d = torch.stack(ds)
            agree = (d.sign() == d.sum(0).sign()) & (d != 0)
            wts = torch.tensor([0.7, 0.3], dtype=torch.float64).reshape(2, *[1] * b.dim())
            oracle[k] = b + (d * agree).sum(0) / (wts * agree).sum(0).clamp(min=1e-300)
    ref = type(base)(base.config).eval()
    ref.load_state_dict({k: v.float() for k, v in oracle.items()})

    merged = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert merged.dtype == torch.float32
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = merged(ids).logits, ref(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # and the merge actually changed something
    assert not torch.allclose(got, base(ids).logits, atol=1e-4)


def test_bfloat16_llama_with_tied_embeddings(tmp_path):
    base = tiny_llama(0, tie=True)
    ft = perturbed(base, 3).to(torch.bfloat16)
    base = base.to(torch.bfloat16)
    base.save_pretrained(tmp_path / "base")
    ft.save_pretrained(tmp_path / "ft")
    out = run(
        tmp_path,
        f"merge_method: linear\nbase_model: {tmp_path / 'base'}\nmodels: [{{model: {tmp_path / 'base'}}}, {{model: {tmp_path / 'ft'}}}]\n",
    )
    config = json.loads((out / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    merged = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert merged.dtype == torch.bfloat16
    want = {k: ((base.state_dict()[k].float() + v.float()) / 2).bfloat16() for k, v in ft.state_dict().items()}
    for k, v in merged.state_dict().items():
        assert torch.equal(v, want[k]), k


def test_bert_style_encoder_without_prefix(tmp_path):
    """Encoders saved without a model prefix (as sentence-transformers checkpoints are) merge by name."""
    cfg = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    torch.manual_seed(0)
    a = transformers.BertModel(cfg).eval()
    b = perturbed(a, 5, scale=0.05)
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b")
    from safetensors import safe_open

    with safe_open(tmp_path / "a" / "model.safetensors", "pt") as f:
        assert any(k.startswith("encoder.") for k in f.keys())  # no "bert." prefix
    out = run(tmp_path, f"merge_method: linear\nmodels: [{{model: {tmp_path / 'a'}}}, {{model: {tmp_path / 'b'}}}]\n")
    merged = transformers.AutoModel.from_pretrained(out).eval()
    ref = transformers.BertModel(cfg).eval()
    ref.load_state_dict(
        {k: (v + b.state_dict()[k]) / 2 if v.is_floating_point() else v for k, v in a.state_dict().items()}
    )
    ids = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).last_hidden_state, ref(ids).last_hidden_state, rtol=1e-5, atol=1e-5)


def test_t5_gradient_runs_over_the_encoder_and_the_decoder_each(tmp_path):
    """An encoder-decoder (3 encoder blocks, 2 decoder blocks): a gradient weight is read at each block's
    place within its own stack, and at 0 outside them, as mergekit places a module's layers; the output
    loads in transformers and computes what the oracle's weights do."""
    cfg = transformers.T5Config(
        vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=3, num_decoder_layers=2, num_heads=2,
        decoder_start_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    a = transformers.T5ForConditionalGeneration(cfg).eval()
    b = perturbed(a, 3, scale=0.05)
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b")
    out = run(
        tmp_path,
        f"merge_method: linear\ndtype: float32\nparameters: {{normalize: false}}\n"
        f"models: [{{model: {tmp_path / 'a'}, parameters: {{weight: [1, 0]}}}}, "
        f"{{model: {tmp_path / 'b'}, parameters: {{weight: [0, 1]}}}}]\n",
    )

    def place(name: str) -> float:
        stack, _, rest = name.partition(".block.")
        return int(rest.split(".")[0]) / {"encoder": 2, "decoder": 1}[stack] if rest else 0.0

    sa, sb = a.state_dict(), b.state_dict()
    ref = transformers.T5ForConditionalGeneration(cfg).eval()
    ref.load_state_dict({k: (1 - place(k)) * v + place(k) * sb[k] for k, v in sa.items()})
    merged = transformers.T5ForConditionalGeneration.from_pretrained(out).eval()
    ids = torch.randint(0, 64, (1, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = merged(input_ids=ids, decoder_input_ids=ids[:, :4]).logits
        want = ref(input_ids=ids, decoder_input_ids=ids[:, :4]).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert place("decoder.block.1.layer.0.SelfAttention.q.weight") == 1.0  # the oracle covers both stacks
