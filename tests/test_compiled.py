"""Compiled generation (cpmctl.compiled) against the eager reference.

The static KV cache runs eagerly here in seconds (its masks and positions are the compiled
graph's); the compiled steps themselves take inductor a minute or more on this machine, so those
tests are marked slow.
"""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from cpmctl.checkpoint import save_model
from cpmctl.cli import app
from cpmctl.compiled import CompiledDecoder, bucket, check_compiler
from cpmctl.config import ModelConfig
from cpmctl.errors import UserError
from cpmctl.generate import decode_one_token, generate, prefill
from cpmctl.model import KVCache, build_model
from cpmctl.static_cache import StaticKVCache

STD = 0.05


def gpt2_like(**overrides) -> ModelConfig:
    fields = dict(
        arch="decoder", vocab_size=256, d_model=64, n_heads=4, d_ff=256, n_layers=2, norm="layer", norm_eps=1e-5,
        position="absolute", max_positions=32, activation="gelu_tanh", gated=False, bias=True, tie_embeddings=True,
        eos_token_id=None, init_std=STD,
    )
    return ModelConfig(**{**fields, **overrides})


def make(name: str, seed: int = 0, **overrides):
    config = gpt2_like(**overrides) if name == "gpt2-like" else ModelConfig.from_preset(name, init_std=STD, **overrides)
    torch.manual_seed(seed)
    return build_model(config).eval()


def prompt(batch: int, length: int, vocab: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def left_padding(batch: int, length: int) -> torch.Tensor:
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, : length // 2] = 0
    return mask


@torch.inference_mode()
def eager_logits(model, ids, mask, steps: int) -> list[torch.Tensor]:
    """Greedy logits per step through `generate`'s eager path (prefill, then one token at a time)."""
    seen = []
    model_logits = model.logits

    def record(hidden):
        out = model_logits(hidden)
        seen.append(out.clone())
        return out

    model.logits = record  # instance attribute: this model only, restored below
    try:
        generate(model, ids, attention_mask=mask, max_new_tokens=steps)
    finally:
        del model.logits
    return seen


@torch.inference_mode()
def static_logits(model, ids, mask, steps: int, extra_slots: int = 5) -> list[torch.Tensor]:
    """The same greedy loop on a StaticKVCache, eagerly: every slot attended, masked by position."""
    batch, width = ids.shape
    length = width + steps + extra_slots  # stale slots past the end must stay masked
    positions = None if mask is None else (mask.cumsum(1) - 1).clamp(min=0)
    prompt_length = width if mask is None else int(mask.sum(1).max())
    cache = StaticKVCache.allocate(model.config, batch, length, layers=model.decoder.applications,
                                   max_position=prompt_length + steps - 1)
    full = None if mask is None else torch.cat([mask, mask.new_ones(batch, length - width)], dim=1)
    logits = model.logits(model.decode(ids, cache=cache, attention_mask=full, position_ids=positions)[:, -1])
    out = [logits]
    for step in range(steps - 1):
        token = logits.argmax(-1)[:, None]
        pos = None if mask is None else positions[:, -1:] + step + 1
        logits = model.logits(model.decode(token, cache=cache, attention_mask=full, position_ids=pos)[:, -1])
        out.append(logits)
    assert cache.length == width + steps - 1
    return out


@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-like"])
@pytest.mark.parametrize("padded", [False, True])
def test_static_cache_matches_the_eager_cache(name, padded):
    model = make(name)
    ids = prompt(2, 6, model.config.vocab_size)
    mask = left_padding(2, 6) if padded else None
    expected, got = eager_logits(model, ids, mask, 7), static_logits(model, ids, mask, 7)
    assert len(expected) == len(got) == 7
    for a, b in zip(expected, got):
        assert (a - b).abs().max() <= 1e-5
        assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_static_cache_rejects_other_architectures_and_depths():
    with pytest.raises(ValueError, match="decoder-only"):
        StaticKVCache.allocate(make("t5-tiny").config, 1, 8, layers=2)
    cache = StaticKVCache.allocate(make("llama-tiny").config, 1, 8, layers=3)
    with pytest.raises(ValueError, match="3 layer slots"):
        cache.match_applications(2)


def test_buckets_are_powers_of_two():
    assert [bucket(n) for n in (1, 16, 17, 100, 128, 129)] == [16, 16, 32, 128, 128, 256]


def test_no_compiler_is_a_user_error():
    import torch._inductor.config as inductor_config

    with inductor_config.patch({"cpp.cxx": (None, "/nonexistent/g++")}):
        with pytest.raises(UserError, match="no C\\+\\+ compiler") as info:
            check_compiler()
        assert info.value.option == "compile"
        with pytest.raises(UserError, match="no C\\+\\+ compiler"):
            CompiledDecoder(make("llama-tiny"))


def test_compile_refuses_encoder_decoders_and_moe():
    with pytest.raises(UserError, match="decoder-only"):
        CompiledDecoder(make("t5-tiny"))
    moe = dict(experts=4, expert_size=40, top_k=1, router="linear")
    with pytest.raises(UserError, match="MoE layers"):
        CompiledDecoder(make("llama-tiny", moe=moe))


def test_infer_compile_without_compiler_exits_2(tmp_path, sp_tokenizer):
    import torch._inductor.config as inductor_config

    config = ModelConfig.from_preset("llama-tiny", vocab_size=sp_tokenizer.vocab_size, init_std=STD)
    save_model(build_model(config).eval(), tmp_path / "m", tokenizer_dir=sp_tokenizer.save(tmp_path / "tok"))
    runner = CliRunner()
    with inductor_config.patch({"cpp.cxx": (None, "/nonexistent/g++")}):
        result = runner.invoke(app, ["infer", str(tmp_path / "m"), "hi", "--compile"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "no C++ compiler" in lines[0] and "--compile" in lines[0]
    result = runner.invoke(app, ["infer", str(tmp_path / "m"), "hi", "--compile", "--offload", "disk", "--memory-budget", "50%"])
    assert result.exit_code == 2 and "--compile needs the weights resident" in result.output


@pytest.mark.slow
@torch.inference_mode()
def test_compiled_generation_equals_eager():
    """Token-identical greedy generation and fp32 logits <= 1e-5, with and without padding; the
    second model has the first's shapes (a warm inductor cache) and decodes with its own weights."""
    for seed in (0, 1):
        model = make("llama-tiny", seed=seed, n_layers=1)
        compiled = CompiledDecoder(model, autotune=False)
        ids = prompt(2, 5, model.config.vocab_size)
        for mask in (None, left_padding(2, 5)):
            expected, _ = generate(model, ids, attention_mask=mask, max_new_tokens=6)
            got, stats = generate(model, ids, attention_mask=mask, max_new_tokens=6, compiled=compiled)
            assert torch.equal(expected, got) and stats["steps"] == 6
        assert len(compiled.stats.graphs) == 4  # prefill and decode, each with and without a mask
        cache = compiled.allocate(2, 11, max_position=10)
        eager_cache = KVCache.for_model(model, 2, 11)
        compiled_logits, eager_logits_ = compiled.prefill(ids, cache), prefill(model, ids, eager_cache)
        for _ in range(6):
            assert (compiled_logits - eager_logits_).abs().max() <= 1e-5
            token = eager_logits_.argmax(-1)[:, None]
            compiled_logits, eager_logits_ = compiled.decode(token, cache), decode_one_token(model, token, eager_cache)
        assert cache.length == eager_cache.length == 11


@pytest.mark.slow
@torch.inference_mode()
def test_decoders_of_several_models_do_not_share_the_recompile_limit():
    """Dynamo counts graphs per code object; each CompiledDecoder compiles its own copies of the
    steps, so decoders of several models in one process each get the whole limit (the benchmark
    against llama.cpp compiled fp32, bf16, int8 and int4 models in one process and hit it)."""
    import torch._dynamo.config as dynamo_config

    with dynamo_config.patch(recompile_limit=2):
        for seed in (0, 1, 2):
            model = make("llama-tiny", seed=seed, n_layers=1)
            compiled = CompiledDecoder(model, autotune=False)
            ids = prompt(1, 5, model.config.vocab_size)
            expected, _ = generate(model, ids, max_new_tokens=3)
            got, _ = generate(model, ids, max_new_tokens=3, compiled=compiled)
            assert torch.equal(expected, got) and len(compiled.stats.graphs) == 2


def test_a_shape_allocated_again_gets_the_same_cache_emptied():
    """CUDA graphs replay fixed addresses, so each (batch, bucket) keeps one cache across runs."""
    model = make("llama-tiny", n_layers=1)
    compiled = CompiledDecoder(model, autotune=False)
    first = compiled.allocate(2, 11, max_position=10)
    first.advance(7)
    again = compiled.allocate(2, 13, max_position=12)  # same bucket (16)
    assert again is first and again.length == 0 and again.max_position == 15  # the bucket's bound, not the run's
    assert all(k.data_ptr() == p for k, p in zip(again.keys, [k.data_ptr() for k in first.keys]))
    assert compiled.allocate(1, 11, max_position=10) is not first  # another batch size
    assert compiled.allocate(2, 40, max_position=39).max_length == 64  # another bucket
    assert not compiled.cuda_graphs  # a CPU model: no CUDA graphs


def test_cuda_graphs_for_a_cpu_model_is_one_error():
    with pytest.raises(UserError, match="CUDA graphs need a model on a CUDA device"):
        CompiledDecoder(make("llama-tiny", n_layers=1), autotune=False, cuda_graphs=True)


def test_a_run_past_an_absolute_position_table_is_refused_before_compiling():
    model = make("gpt2-like")
    limit = model.config.max_positions
    compiled = CompiledDecoder(model, autotune=False)
    assert compiled.allocate(1, limit, max_position=limit - 1).max_position == limit - 1
    with pytest.raises(ValueError, match=f"sequence of {limit + 1} positions exceeds the model's {limit}"):
        compiled.allocate(1, limit + 1, max_position=limit)


@pytest.mark.slow
@torch.inference_mode()
def test_another_length_in_the_same_bucket_reuses_the_graphs():
    """The cache's position bound belongs to its shape: a bound that followed max_new_tokens made
    dynamo recompile the prefill for every new length."""
    from torch._dynamo.utils import counters

    model = make("llama-tiny", n_layers=1)
    compiled = CompiledDecoder(model, autotune=False)
    ids = prompt(1, 5, model.config.vocab_size)
    for new in (6, 2, 9):
        expected, _ = generate(model, ids, max_new_tokens=new)
        got, _ = generate(model, ids, max_new_tokens=new, compiled=compiled)
        assert torch.equal(expected, got)
        if new == 6:
            graphs = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs
