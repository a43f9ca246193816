"""GPU paths: every method gives the CPU's result within float32 rounding. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from conftest import load_output

from merger.cli import cli

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

RECIPES = {
    "linear": "merge_method: linear\nmodels: [{{model: {ft1}, parameters: {{weight: 0.7}}}}, {{model: {ft2}}}]\n",
    "task_arithmetic": "merge_method: task_arithmetic\nbase_model: {base}\n"
    "models: [{{model: {ft1}, parameters: {{weight: 0.7}}}}, {{model: {ft2}, parameters: {{weight: -0.2}}}}]\n",
    "ties": "merge_method: ties\nbase_model: {base}\n"
    "models: [{{model: {ft1}, parameters: {{density: 0.3}}}}, {{model: {ft2}, parameters: {{density: 0.6}}}}]\n",
}


@pytest.mark.parametrize("method", sorted(RECIPES))
def test_gpu_equals_cpu(tmp_path, family, method):
    paths, _ = family
    (tmp_path / "r.yaml").write_text(
        RECIPES[method].format(**{k: str(v) for k, v in paths.items()}) + "out_dtype: float32\n"
    )
    outs = {}
    for device in ("cpu", "cuda"):
        result = CliRunner().invoke(
            cli, ["apply", str(tmp_path / "r.yaml"), "-o", str(tmp_path / device), "--device", device, "-q"]
        )
        assert result.exit_code == 0, result.output
        outs[device] = load_output(tmp_path / device)
    for name, cpu in outs["cpu"].items():
        torch.testing.assert_close(outs["cuda"][name], cpu, rtol=1e-6, atol=1e-6)


def test_gpu_json_reports_gpu_memory(tmp_path, family):
    import json

    paths, _ = family
    (tmp_path / "r.yaml").write_text(RECIPES["ties"].format(**{k: str(v) for k, v in paths.items()}))
    result = CliRunner().invoke(cli, ["apply", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "o"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["device"] == "cuda" and summary["peak_gpu_bytes"] > 0
