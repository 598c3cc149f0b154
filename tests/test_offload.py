"""`cpmctl infer --offload`: offloaded models against the same checkpoint fully resident, bit for bit."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch

from cpmctl.checkpoint import load_model, save_model
from cpmctl.config import ModelConfig
from cpmctl.errors import UserError
from cpmctl.generate import generate
from cpmctl.model import build_model
from cpmctl.offload import OffloadError, checkpoint_weight_bytes, infmoe_order, load_offloaded
from cpmctl.units import parse_size

MOE = dict(experts=8, expert_size=16, top_k=2)



def _budget(path, text: str, dtype=None) -> int:
    """A budget as `cpmctl infer --memory-budget` reads it (a percentage of the weights in the run dtype)."""
    return parse_size(text, total=checkpoint_weight_bytes(path, dtype))


def config(kind: str, moe: dict | None) -> ModelConfig:
    if kind == "decoder":
        fields = dict(arch="decoder", vocab_size=96, d_model=32, n_heads=4, d_ff=128, n_layers=3, norm="rms",
                      position="rotary", max_positions=64, activation="silu", gated=True, bias=False,
                      tie_embeddings=False, eos_token_id=None)
    else:  # encoder-decoder, T5/CPM-2 style, biases left out; relu like MoEfied models
        fields = dict(arch="encoder-decoder", vocab_size=96, d_model=32, n_heads=4, d_ff=128, n_layers=2,
                      n_decoder_layers=2, norm="rms", position="relative", activation="relu", gated=False,
                      attn_scale=False, relative_buckets=8, relative_max_distance=32, max_positions=64,
                      eos_token_id=None)
    return ModelConfig(**fields, moe=moe, init_std=0.2)


def make_checkpoint(path, kind: str, moe: dict | None, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(config(kind, moe))
    save_model(model, path)
    return path


PROMPTS = torch.randint(3, 96, (3, 7), generator=torch.Generator().manual_seed(5))


@torch.no_grad()
def outputs(model):
    """Greedy tokens for a batch and for one prompt alone (different MoE paths), and full logits."""
    batch, _ = generate(model, PROMPTS, max_new_tokens=5)
    single, _ = generate(model, PROMPTS[:1], max_new_tokens=5)
    if model.config.arch == "decoder":
        logits = model(PROMPTS)
    else:
        logits = model(PROMPTS, decoder_input_ids=PROMPTS[:, :4])
    return batch, single, logits


CASES = [("decoder", MOE), ("encoder-decoder", MOE), ("decoder", None), ("encoder-decoder", None),
         ("decoder", dict(MOE, router="mlp", top_k=3))]


@pytest.mark.parametrize("kind,moe", CASES, ids=["moe-dec", "moe-encdec", "dense-dec", "dense-encdec", "moefied-mlp"])
def test_offloaded_equals_resident_bit_for_bit_across_budgets(tmp_path, kind, moe):
    ckpt = make_checkpoint(tmp_path / "m", kind, moe)
    model, _ = load_model(ckpt)
    want = outputs(model)
    total = sum(t.nbytes for t in model.state_dict().values())
    _, _, probe = load_offloaded(ckpt, mode="disk", budget=total, device=torch.device("cpu"), dtype=None)
    minimum, slot = probe.plan.arithmetic.minimum, probe.plan.arithmetic.slot_bytes
    probe.close()
    for budget in (minimum, minimum + 2 * slot, minimum + 5 * slot, total):
        for prefetch in (True, False):
            model, _, engine = load_offloaded(ckpt, mode="disk", budget=budget, device=torch.device("cpu"),
                                              dtype=None, prefetch=prefetch)
            try:
                got = outputs(model)
                stats = engine.stats()
            finally:
                engine.close()
            for a, b in zip(want, got):
                assert torch.equal(a, b), (budget, prefetch)
            assert stats["weights_peak_bytes"] <= budget
            assert stats["misses"] > 0 or stats["slots"] == stats["units"]
            if stats["slots"] < stats["units"]:
                assert stats["bytes_moved"] > 0


def test_budget_below_minimum_states_it(tmp_path):
    ckpt = make_checkpoint(tmp_path / "m", "decoder", MOE)
    _, _, probe = load_offloaded(ckpt, mode="disk", budget=_budget(ckpt, "100%"), device=torch.device("cpu"), dtype=None)
    minimum = probe.plan.arithmetic.minimum
    probe.close()
    with pytest.raises(UserError, match="below this model's minimum"):
        load_offloaded(ckpt, mode="disk", budget=minimum - 1, device=torch.device("cpu"), dtype=None)


def test_the_cache_holds_what_the_budget_buys_and_reuses_it(tmp_path):
    ckpt = make_checkpoint(tmp_path / "m", "decoder", MOE)
    _, _, probe = load_offloaded(ckpt, mode="disk", budget=_budget(ckpt, "100%"), device=torch.device("cpu"), dtype=None)
    plan = probe.plan
    probe.close()
    assert plan.unit_kind == "expert" and len(plan.units) == 3 * 8
    model, _, engine = load_offloaded(ckpt, mode="disk", budget=plan.arithmetic.minimum + 3 * plan.arithmetic.slot_bytes,
                                      device=torch.device("cpu"), dtype=None, prefetch=False)
    with torch.no_grad():
        model(PROMPTS)
        moved = engine.cache.bytes_moved
        model(PROMPTS[:1, :1])  # one token, 2 experts a layer: some of them were just used
    stats = engine.stats()
    engine.close()
    assert stats["slots"] == 4
    assert stats["bytes_moved"] == stats["loads"] * probe.units[0].numel * 4  # padding is not moved
    assert moved > 0 and stats["hits"] > 0


def _flip_byte(path, offset: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0xFF]))


def test_a_corrupt_expert_is_a_checksum_error_not_a_wrong_output(tmp_path):
    ckpt = make_checkpoint(tmp_path / "m", "decoder", MOE)
    model, _, engine = load_offloaded(ckpt, mode="disk", budget=_budget(ckpt, "100%"), device=torch.device("cpu"), dtype=None)
    info = engine.units[5].parts[0]
    engine.close()
    _flip_byte(info.file, info.byte_offset + 3)
    model, _, engine = load_offloaded(ckpt, mode="disk", budget=_budget(ckpt, "100%"), device=torch.device("cpu"), dtype=None)
    try:
        with pytest.raises(OffloadError, match="checksum mismatch"):
            with torch.no_grad():
                for _ in range(4):  # until expert 5 of layer 0 is needed
                    model(torch.randint(3, 96, (8, 8)))
    finally:
        engine.close()


def test_a_corrupt_resident_weight_is_caught_at_load(tmp_path):
    ckpt = make_checkpoint(tmp_path / "m", "decoder", MOE)
    _, handle, engine = load_offloaded(ckpt, mode="disk", budget=_budget(ckpt, "100%"), device=torch.device("cpu"), dtype=None)
    info = handle.tensor_info("embed.tokens.weight")
    engine.close()
    _flip_byte(info.file, info.byte_offset + 10)
    with pytest.raises(OffloadError, match="checksum mismatch in embed.tokens.weight"):
        load_offloaded(ckpt, mode="disk", budget=_budget(ckpt, "100%"), device=torch.device("cpu"), dtype=None)


def test_a_file_truncated_after_start_is_a_short_read_error(tmp_path):
    ckpt = make_checkpoint(tmp_path / "m", "decoder", MOE)
    _, _, engine = load_offloaded(ckpt, mode="disk", budget=_budget(ckpt, "100%"), device=torch.device("cpu"), dtype=None)
    last = max((p for u in engine.units for p in u.parts), key=lambda p: p.byte_offset)
    engine.close()
    model, _, engine = load_offloaded(ckpt, mode="disk", budget=_budget(ckpt, "100%"), device=torch.device("cpu"), dtype=None)
    with open(last.file, "r+b") as fh:
        fh.truncate(last.byte_offset + 4)
    try:
        with pytest.raises(OffloadError, match="short read"):
            with torch.no_grad():
                for _ in range(6):
                    model(torch.randint(3, 96, (8, 8)))
    finally:
        engine.close()


def test_a_missing_or_truncated_shard_is_refused_up_front(tmp_path):
    from cpmctl.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = build_model(config("decoder", MOE))
    save_checkpoint(tmp_path / "m", model.config, model.state_dict(), max_shard_bytes=40_000)
    shards = sorted((tmp_path / "m").glob("model-*.safetensors"))
    assert len(shards) > 1
    size = shards[-1].stat().st_size
    with open(shards[-1], "r+b") as fh:
        fh.truncate(size - 100)
    with pytest.raises(UserError, match="truncated|shorter|size"):
        load_offloaded(tmp_path / "m", mode="disk", budget=_budget(tmp_path / "m", "50%"), device=torch.device("cpu"), dtype=None)
    shards[-1].unlink()
    with pytest.raises(UserError, match="does not exist|missing"):
        load_offloaded(tmp_path / "m", mode="disk", budget=_budget(tmp_path / "m", "50%"), device=torch.device("cpu"), dtype=None)


def test_a_loader_that_dies_mid_load_is_an_error_not_an_output(tmp_path, monkeypatch):
    ckpt = make_checkpoint(tmp_path / "m", "decoder", MOE)
    model, _, engine = load_offloaded(ckpt, mode="disk", budget=_budget(ckpt, "100%"), device=torch.device("cpu"), dtype=None)
    real, calls = engine.source.read_part, []

    def dying(part, dest):
        calls.append(part.name)
        if len(calls) == 3:
            dest.fill_(float("nan"))  # half-written bytes must never be computed with
            raise OSError("reader killed")
        return real(part, dest)

    monkeypatch.setattr(engine.source, "read_part", dying)
    try:
        with pytest.raises(OffloadError, match="reader killed"):
            with torch.no_grad():
                model(PROMPTS)
        with pytest.raises(OffloadError, match="failed"):
            with torch.no_grad():
                model(PROMPTS)
    finally:
        engine.close()


def test_cpu_offload_needs_a_gpu_and_budgets_parse():
    with pytest.raises(UserError, match="on a CPU offload to disk"):
        load_offloaded("nowhere", mode="cpu", budget=2**30, device=torch.device("cpu"), dtype=None)
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("512MB") == 512 * 10**6
    assert parse_size("1.5k") == 1536
    assert parse_size("25%", total=1000) == 250
    for bad in ("lots", "-3", "0", "150%", "2 parsecs"):
        with pytest.raises(UserError):
            parse_size(bad, total=100)


def _feasible(order, a, missing, b, slots):
    elapsed, loaded = 0.0, 0
    for t, e in enumerate(order, start=1):
        if e in missing:
            loaded += 1
            if elapsed < loaded * b:
                return False
        elapsed += a[e]
    return True


def test_infmoe_order_puts_resident_first_and_hides_loads_when_an_order_can():
    rng = random.Random(0)
    found = 0
    for _ in range(300):
        n = rng.randint(1, 6)
        a = {e: rng.choice([0.5, 1, 2, 3, 5]) for e in range(n)}
        missing = set(rng.sample(range(n), rng.randint(0, n)))
        resident = {e: a[e] for e in a if e not in missing}
        b = rng.choice([0.5, 1.0, 2.0])
        order, hidden = infmoe_order(resident, {e: a[e] for e in missing}, b)
        assert sorted(order) == list(range(n))
        assert set(order[: len(resident)]) == set(resident)
        assert hidden == _feasible(order, a, missing, b, n)
        # Among orders that put the resident experts first, none hides loads that ours does not.
        best = any(_feasible(list(r) + list(m), a, missing, b, n)
                   for r in itertools.permutations(resident) for m in itertools.permutations(missing))
        assert hidden == best
        found += hidden
    assert 30 < found < 300  # the cases exercise both outcomes


def test_infer_cli_offload_matches_resident_and_reports(tmp_path, sp_tokenizer):
    from typer.testing import CliRunner

    from cpmctl.cli import app

    torch.manual_seed(0)
    cfg = ModelConfig(**{**config("decoder", MOE).to_dict(), "vocab_size": sp_tokenizer.vocab_size})
    save_model(build_model(cfg), tmp_path / "m", tokenizer_dir=sp_tokenizer.save(tmp_path / "tok"))
    inputs = tmp_path / "in.jsonl"
    inputs.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["the module", "a function that", "return"]))
    runner = CliRunner()
    base = ["infer", str(tmp_path / "m"), "--input", str(inputs), "--max-new-tokens", "6", "--json"]
    plain = runner.invoke(app, base)
    assert plain.exit_code == 0, plain.output
    off = runner.invoke(app, base + ["--offload", "disk", "--memory-budget", "85%"])
    assert off.exit_code == 0, off.output
    plain_out, off_out = json.loads(plain.stdout)["result"], json.loads(off.stdout)["result"]
    assert [o["generated"] for o in off_out["outputs"]] == [o["generated"] for o in plain_out["outputs"]]
    stats = off_out["stats"]["offload"]
    assert stats["weights_peak_bytes"] <= stats["budget_bytes"] and stats["bytes_moved"] > 0
    for args, needle in [(["--offload", "disk"], "needs --memory-budget"), (["--memory-budget", "1GiB"], "needs --offload"),
                         (["--offload", "tape", "--memory-budget", "1GiB"], "--offload must be"),
                         (["--offload", "disk", "--memory-budget", "1kB"], "below this model's minimum")]:
        bad = runner.invoke(app, base + args)
        lines = [line for line in bad.stderr.splitlines() if line.strip()]
        assert bad.exit_code == 2 and len(lines) == 1 and needle in lines[0], bad.output


def test_checkpoints_without_recorded_crcs_still_run_and_say_so(tmp_path):
    ckpt = make_checkpoint(tmp_path / "m", "decoder", MOE)
    provenance_path = ckpt / "cpmctl.json"
    provenance = json.loads(provenance_path.read_text())
    del provenance["tensor_crc32"]  # as written before cpmctl recorded them
    provenance_path.write_text(json.dumps(provenance))
    want = outputs(load_model(ckpt)[0])
    model, _, engine = load_offloaded(ckpt, mode="disk", budget=_budget(ckpt, "40%"), device=torch.device("cpu"), dtype=None)
    try:
        got = outputs(model)
        assert engine.stats()["checksums"] == "not recorded"
    finally:
        engine.close()
    assert all(torch.equal(a, b) for a, b in zip(want, got))


def test_hook_based_offloaders_see_the_untied_head_weight():
    """accelerate's cpu_offload brings a weight in only while its own module runs: the LM head
    must call its projection module, or an offloaded model computes garbage without a warning."""
    from accelerate import cpu_offload

    torch.manual_seed(0)
    model = build_model(ModelConfig.from_preset("llama-tiny", init_std=0.2)).eval()
    with torch.no_grad():
        want = model(PROMPTS)
        cpu_offload(model, execution_device=torch.device("cpu"))
        got = model(PROMPTS)
    assert torch.equal(want, got)


@pytest.mark.parametrize("compute,host_layers", [("host", 0), ("device", 1), ("auto", 0)])
def test_experts_computed_on_the_host_equal_resident_bit_for_bit(tmp_path, compute, host_layers):
    """The CPU stands in for both sides: the device route copies experts into slots, the host
    route computes them from the host copy; both must give the resident model's bits."""
    from cpmctl.offload.placement import ComputeCosts

    path = make_checkpoint(tmp_path / "m", "decoder", MOE)
    resident, ckpt = load_model(path)
    want = outputs(resident)
    ckpt.close()
    # costs that send 1-2 rows to the host and more to the device: both routes run in "auto"
    costs = ComputeCosts(host_flops=1e9, device_flops=1e12, h2d_bytes=1e9)
    model, ckpt, engine = load_offloaded(path, mode="cpu", budget=_budget(path, "70%"), device=torch.device("cpu"), dtype=None,
                                         expert_compute=compute, host_layers=host_layers, costs=costs)
    try:
        got = outputs(model)
        stats = engine.stats()
    finally:
        engine.close()
        ckpt.close()
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert stats["experts_computed_on_host"] > 0
    if compute == "host":
        assert stats["misses"] == 1  # only the start-up measurement copies an expert in on demand


def test_host_compute_without_a_host_copy_is_refused(tmp_path):
    path = make_checkpoint(tmp_path / "m", "decoder", MOE)
    for compute, layers in (("host", 0), ("device", 2)):
        with pytest.raises(UserError, match="needs a host copy"):
            load_offloaded(path, mode="disk", budget=_budget(path, "70%"), device=torch.device("cpu"), dtype=None,
                           expert_compute=compute, host_layers=layers)


def test_cli_host_compute_without_a_host_copy_is_one_line_exit_2(tmp_path):
    from typer.testing import CliRunner

    from cpmctl.cli import app

    path = make_checkpoint(tmp_path / "m", "decoder", MOE)
    done = CliRunner().invoke(app, ["infer", str(path), "hello", "--offload", "disk", "--memory-budget", "70%",
                                    "--expert-compute", "host"])
    assert done.exit_code == 2 and done.output.strip().count("\n") == 0, done.output
    assert "needs a host copy" in done.output and "(--expert-compute)" in done.output
