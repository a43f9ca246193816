"""The plan's per-tensor sources and parameters: layers found by name for any architecture, what a
method is told of each tensor (TensorContext), and one model supplying two tensors to one output."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys

import pytest
import torch
from conftest import write_checkpoint

from merger.layers import LayerStack, find_stack, find_stacks, stack_of
from merger.methods import Method, TensorContext, tensor_seed
from merger.methods.linear import LinearModelParams, LinearParams
from merger.plan import Source, build_plan
from merger.recipe import parse_recipe
from merger.stream import merge_tensors


@pytest.mark.parametrize(
    ("names", "prefix", "count"),
    [
        (["model.embed_tokens.weight", "model.layers.0.mlp.up.weight", "model.layers.11.mlp.up.weight"], "model.layers", 12),
        (["transformer.wte.weight", "transformer.h.3.attn.c_attn.weight", "transformer.h.0.ln_1.bias"], "transformer.h", 4),
        (["encoder.block.7.layer.0.SelfAttention.q.weight", "encoder.block.0.layer.1.DenseReluDense.wi.weight"], "encoder.block", 8),
        (["bert.encoder.layer.5.output.dense.weight", "bert.encoder.layer.4.output.dense.weight", "bert.pooler.dense.weight"], "bert.encoder.layer", 6),
        (["model.decoder.layers.2.fc1.weight", "model.decoder.layers.0.fc1.weight", "model.decoder.embed_tokens.weight"], "model.decoder.layers", 3),
        (["layers.0.w", "layers.1.w", "ids"], "layers", 2),
    ],
)  # fmt: skip
def test_the_layer_stack_is_found_by_name_for_any_architecture(names, prefix, count):
    stack = find_stack(names)
    assert stack == LayerStack(prefix, count)
    layered = [n for n in names if n.startswith(prefix + ".")]
    assert all(stack.index(n) is not None for n in layered)
    assert all(stack.index(n) is None for n in names if n not in layered)


def test_the_stack_is_the_numbered_prefix_with_the_most_indices():
    """Experts are numbered too, inside each layer; and a model may have a few numbered extras."""
    names = [f"model.layers.{i}.mlp.experts.{e}.w1.weight" for i in range(3) for e in range(8)]
    names += ["vision.patch.0.weight", "vision.patch.1.weight", "model.norm.weight"]
    stack = find_stack(names)
    assert stack == LayerStack("model.layers", 3)
    assert stack.index("model.layers.2.mlp.experts.7.w1.weight") == 2
    assert stack.index("model.norm.weight") is None and stack.index("vision.patch.1.weight") is None
    assert stack.renamed("model.layers.2.mlp.experts.7.w1.weight", 10) == "model.layers.10.mlp.experts.7.w1.weight"
    assert find_stack(["embed.weight", "head.weight"]) is None
    with pytest.raises(ValueError, match="not a tensor of the layers"):
        stack.renamed("model.norm.weight", 1)


def test_tensor_seeds_are_sha256_of_the_recipe_seed_and_the_name():
    want = int.from_bytes(hashlib.sha256(b"0:model.layers.3.mlp.up_proj.weight").digest()[:8], "little") >> 1
    assert tensor_seed(0, "model.layers.3.mlp.up_proj.weight") == want
    assert tensor_seed(1, "a") != tensor_seed(0, "a") != tensor_seed(0, "b")
    assert 0 <= tensor_seed(7, "x") < 1 << 63


def _family(tmp_path):
    g = torch.Generator().manual_seed(0)
    names = ["model.embed_tokens.weight", "model.norm.weight", "ids"]
    names += [f"model.layers.{i}.{w}" for i in range(3) for w in ("q.weight", "up.weight")]
    models = []
    for m in range(3):
        t = {n: torch.randn(8, 4, generator=g) for n in names}
        t["ids"] = torch.arange(5)
        models.append((write_checkpoint(tmp_path / f"m{m}", t), t))
    return models


def _recording(calls: list) -> Method:
    """linear, recording what it is given of each tensor: its context, its prepare's raw input chunks."""

    def prepare(task_vectors, numel, models, params, *, context=None, inputs=None):
        calls.append(("prepare", context, [[x.clone() for x in xs] + [b.clone()] for xs, b in inputs()]))
        return None

    def fn(tensors, base, models, params, state=None, offset=0, *, context=None):
        calls.append(("fn", context, offset))
        return sum(x * m.weight for x, m in zip(tensors, models))

    return Method("recording", fn, LinearModelParams, LinearParams, needs_base=True, summary="", prepare=prepare)


def test_a_method_is_told_each_tensors_name_layer_and_seed_and_sees_its_inputs_as_they_are(tmp_path):
    (base, b), (ft1, t1), (ft2, t2) = _family(tmp_path)
    spec = parse_recipe(
        f"merge_method: task_arithmetic\nbase_model: {base}\nmodels: [{{model: {ft1}}}, {{model: {ft2}}}]\n"
    )
    plan = build_plan(spec, device="cpu")
    calls: list = []
    plan.spec = dataclasses.replace(plan.spec, method=_recording(calls))
    plan.compute_dtype = "float64"  # no fused kernel: the method's own functions
    merged = dict(merge_tensors(plan))
    prepared = {c[1].name: c for c in calls if c[0] == "prepare"}
    for name, out in merged.items():
        if name == "ids":
            assert name not in prepared  # copied, never merged
            continue
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        assert prepared[name][1] == TensorContext(name, layer, tensor_seed(0, name), tuple(t1[name].shape))
        (chunk,) = prepared[name][2]  # one chunk: the tensors as stored, in ingredient order, then the base
        assert [torch.equal(c, x[name].double().reshape(-1)) for c, x in zip(chunk, (t1, t2, b))] == [True] * 3
        assert torch.equal(out, (t1[name].double() + t2[name].double()).float())
    assert {c[1].name for c in calls if c[0] == "fn"} == set(merged) - {"ids"}


def test_one_model_may_supply_two_tensors_to_one_output(tmp_path):
    """Views are keyed by (model, tensor name): an output read from two tensors of the same model (as a
    slice of one model's layers over another's will be) gets both."""
    (m0, t0), (m1, t1), _ = _family(tmp_path)
    spec = parse_recipe(
        f"merge_method: linear\nmodels: [{{model: {m0}, parameters: {{weight: 3}}}}, {{model: {m1}}}]\n"
    )
    plan = build_plan(spec, device="cpu")
    name = "model.layers.1.q.weight"
    model = plan.inputs[0]
    for i, shard in enumerate(plan.shards):  # the second ingredient's source: layer 2 of the first model
        tensors = tuple(
            dataclasses.replace(t, sources=(Source(model, name), Source(model, "model.layers.2.q.weight")))
            if t.name == name
            else t
            for t in shard.tensors
        )
        plan.shards[i] = dataclasses.replace(shard, tensors=tensors)
    for compute in ("float32", "float64"):  # the fused kernel, and torch
        plan.compute_dtype = compute
        merged = dict(merge_tensors(plan))
        want = (3 * t0[name].double() + t0["model.layers.2.q.weight"].double()) / 4
        torch.testing.assert_close(merged[name], want.float(), rtol=1e-6, atol=1e-6)
        other = "model.layers.0.q.weight"
        torch.testing.assert_close(merged[other], ((3 * t0[other] + t1[other]) / 4), rtol=1e-6, atol=1e-6)
    assert plan.stored_bytes(plan.tensors[[t.name for t in plan.tensors].index(name)]) == 2 * 8 * 4 * 4


def test_every_stack_of_an_encoder_decoder_or_a_vision_language_model_is_found():
    t5 = [
        f"{s}.block.{i}.layer.0.SelfAttention.{w}.weight"
        for s in ("encoder", "decoder")
        for i in range(4)
        for w in "qk"
    ]
    assert find_stacks([*t5, "decoder.block.0.layer.1.EncDecAttention.q.weight", "shared.weight"]) == [
        LayerStack("decoder.block", 4),
        LayerStack("encoder.block", 4),
    ]  # the main one first: the most tensors breaks the tie
    vl = [f"model.layers.{i}.{w}.weight" for i in range(6) for w in ("q", "k")]
    vl += [f"visual.blocks.{i}.{w}.weight" for i in range(3) for w in ("qkv", "proj")]
    vl += ["visual.merger.mlp.0.weight", "visual.merger.mlp.2.weight", "lm_head.weight"]  # 0, 2: no stack
    stacks = find_stacks(vl)
    assert stacks == [LayerStack("model.layers", 6), LayerStack("visual.blocks", 3)]
    assert stack_of(stacks, "visual.blocks.2.proj.weight") == (stacks[1], 2)
    assert stack_of(stacks, "visual.merger.mlp.2.weight") is None
    # one tensor per index is an extra, not layers
    assert find_stacks([*vl[:12], "vision.patch.0.weight", "vision.patch.1.weight"]) == [LayerStack("model.layers", 6)]
    assert find_stacks(["embed.weight"]) == []


def test_missing_and_extra_tensors_are_listed_in_the_same_order_every_run(tmp_path):
    """Recipe order of the models, then the reference's order of its tensors, then the extra tensors' names
    in natural order: the same under any PYTHONHASHSEED (a set once ordered them)."""
    names = ["embed", "layers.0.w", "layers.1.w", "layers.2.w", "norm"]
    write_checkpoint(tmp_path / "ref", {n: torch.ones(2) for n in names})
    extra = {n: torch.ones(1) for n in ("extra.10", "extra.2", "extra.1")}
    write_checkpoint(tmp_path / "ft1", {n: torch.ones(2) for n in names if n not in ("layers.1.w", "norm")} | extra)
    write_checkpoint(tmp_path / "ft2", {n: torch.ones(2) for n in names if n != "embed"})
    (tmp_path / "recipe.yaml").write_text("merge_method: linear\nmodels: [{model: ref}, {model: ft1}, {model: ft2}]\n")
    where = "error: recipe.yaml:2: models"
    want = (
        f"{where}[1].model: 'ft1' lacks tensor 'layers.1.w' (present in 'ref')\n"
        f"{where}[1].model: 'ft1' lacks tensor 'norm' (present in 'ref')\n"
        f"{where}[1].model: 'ft1' has tensor 'extra.1' that 'ref' lacks\n"
        f"{where}[1].model: 'ft1' has tensor 'extra.2' that 'ref' lacks\n"
        f"{where}[1].model: 'ft1' has tensor 'extra.10' that 'ref' lacks\n"
        f"{where}[2].model: 'ft2' lacks tensor 'embed' (present in 'ref')\n"
    )
    for seed in ("0", "1", "2", "3"):
        done = subprocess.run(
            [sys.executable, "-m", "merger", "plan", "recipe.yaml"],
            cwd=tmp_path,
            env=os.environ | {"PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert (done.returncode, done.stderr) == (2, want), seed
