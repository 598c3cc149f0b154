"""Offloaded inference on the imported Hugging Face MoE families: `load_offloaded` (the engine
behind `cpmctl infer --offload disk --memory-budget B`) gives the resident model's logits and
greedy tokens bit for bit at three budgets per family, its router and prefetcher use the family's
own routing (shared experts and dense layers stay resident), and the CLI run matches."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from test_hf_families import PROMPTS as TEXTS  # noqa: E402
from test_hf_moe_families import MOE_FAMILIES, save_moe  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from cpmctl import hf  # noqa: E402
from cpmctl.checkpoint import load_model  # noqa: E402
from cpmctl.cli import app  # noqa: E402
from cpmctl.generate import generate  # noqa: E402
from cpmctl.moe import MoEFeedForward  # noqa: E402
from cpmctl.offload import OffloadedMoE, load_offloaded  # noqa: E402

CPU = torch.device("cpu")
PROMPTS = torch.randint(4, 96, (3, 7), generator=torch.Generator().manual_seed(5))


@torch.no_grad()
def outputs(model):
    batch, _ = generate(model, PROMPTS, max_new_tokens=5)
    single, _ = generate(model, PROMPTS[:1], max_new_tokens=5)
    return batch, single, model(PROMPTS)


@pytest.fixture(scope="module", params=list(MOE_FAMILIES))
def imported(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    _, src = save_moe(request.param, tmp)
    return hf.import_hf(src, tmp / "ck")


def test_offloaded_equals_resident_at_three_budgets(imported):
    model, handle = load_model(imported)
    handle.close()
    want = outputs(model)
    _, _, probe = load_offloaded(imported, mode="disk", budget=2**40, device=CPU, dtype=None)
    minimum, slot, units = probe.plan.arithmetic.minimum, probe.plan.arithmetic.slot_bytes, probe.plan.arithmetic.units
    probe.close()
    for budget in (minimum, minimum + units // 4 * slot, minimum + units // 2 * slot):
        model, _, engine = load_offloaded(imported, mode="disk", budget=budget, device=CPU, dtype=None)
        try:
            got = outputs(model)
            stats = engine.stats()
        finally:
            engine.close()
        for a, b in zip(want, got):
            assert torch.equal(a, b), budget
        assert stats["weights_peak_bytes"] <= budget and stats["bytes_moved"] > 0


def test_prefetch_uses_the_family_router(imported):
    model, _, engine = load_offloaded(imported, mode="disk", budget=2**40, device=CPU, dtype=None)
    try:
        layers = [m for m in model.modules() if isinstance(m, OffloadedMoE)]
        assert layers and all(isinstance(m.moe, MoEFeedForward) for m in layers)
        x = torch.randn(5, model.config.d_model, generator=torch.Generator().manual_seed(2))
        asked = []
        engine.cache.prefetch = lambda unit: asked.append(unit.key[2])
        layers[0].prefetch_for(x)
        experts, _ = layers[0].moe.route(x)
        assert sorted(asked) == sorted(set(experts.flatten().tolist()))
    finally:
        engine.close()


def test_infer_cli_offload_matches_resident(imported, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    base = ["infer", str(imported), "--input", str(prompts), "--max-new-tokens", "6", "--json"]
    plain = CliRunner().invoke(app, base)
    off = CliRunner().invoke(app, base + ["--offload", "disk", "--memory-budget", "60%"])
    assert plain.exit_code == 0 and off.exit_code == 0, (plain.output, off.output)
    generated = [o["generated"] for o in json.loads(off.stdout)["result"]["outputs"]]
    assert generated == [o["generated"] for o in json.loads(plain.stdout)["result"]["outputs"]]
    assert json.loads(off.stdout)["result"]["stats"]["offload"]["bytes_moved"] > 0
