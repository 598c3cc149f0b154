"""Parameter-shared stacks as ODE steps: iterations / step-size semantics against hand-written
loops, bit-exact defaults, grouped sharing order, KV-cache generation at fewer iterations,
step-robust pre-training (deterministic schedule, exact resume) and the user-facing errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cpmctl import iterations
from cpmctl.checkpoint import load_model, save_model
from cpmctl.cli import app
from cpmctl.config import ModelConfig
from cpmctl.data import prepare
from cpmctl.errors import UserError
from cpmctl.generate import decode_one_token, generate, prefill
from cpmctl.model import (
    KVCache, applied_block_parameters, build_model, distinct_block_parameters, iteration_info, set_iterations,
)
from cpmctl.stages import pretrain as stage
from cpmctl.training import model_flops_per_token, read_metrics
from cpmctl.training_state import state_dirs

RUNNER = CliRunner()
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def shared_llama(layers: int = 4, groups: int | None = None, seed: int = 0, **overrides):
    sharing = {"share_groups": groups} if groups is not None else {"share_layers": True}
    config = ModelConfig.from_preset("llama-tiny", n_layers=layers, init_std=0.05, **sharing, **overrides)
    torch.manual_seed(seed)
    return build_model(config).eval()


def tokens(batch: int, length: int, vocab: int = 512, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def hand_loop(model, ids: torch.Tensor, order: list[int], beta: float, start_scale: float = 1.0) -> torch.Tensor:
    """Logits of a decoder-only model applying blocks `order` (indices into the distinct blocks),
    each residual branch scaled by beta: h <- h + beta * attn(norm h); h <- h + beta * ffn(norm h),
    from the embeddings times `start_scale`."""
    stack = model.decoder
    positions = torch.arange(ids.shape[1])
    h = model.embed(ids, positions) * start_scale
    rotary = model._rotary(positions)
    for layer, g in enumerate(order):
        block = stack.blocks[g]
        h = h + beta * block.attn(block.attn_norm(h), causal=True, rotary=rotary, cache=None, layer=layer)
        h = h + beta * block.ffn(block.ffn_norm(h))
    return model.logits(stack.final_norm(h))


# -- semantics -----------------------------------------------------------------------------------
@pytest.mark.parametrize("groups, iterations, order, beta", [
    (None, 4, [0, 0, 0, 0], 1.0),
    (None, 2, [0, 0], 2.0),
    (None, 8, [0] * 8, 0.5),
    (2, 4, [0, 0, 1, 1], 1.0),
    (2, 2, [0, 1], 2.0),
    (2, 6, [0, 0, 0, 1, 1, 1], 4 / 6),
])
def test_iterations_and_step_match_a_hand_written_loop(groups, iterations, order, beta):
    model = shared_llama(groups=groups)
    ids = tokens(2, 9)
    set_iterations(model, iterations)
    with torch.no_grad():
        got = model(ids)
    assert torch.equal(got, hand_loop(model, ids, order, beta))
    info = iteration_info(model)
    assert (info["trained_iterations"], info["iterations"], info["step_size"]) == (4, iterations, beta)
    assert info["speedup"] == 4 / iterations and info["shared_blocks"] == (groups or 1)


def test_explicit_step_size_overrides_l_over_n():
    model = shared_llama()
    ids = tokens(2, 9)
    set_iterations(model, 2, step_size=1.0)  # naive truncation: two unit steps
    with torch.no_grad():
        naive = model(ids)
    assert torch.equal(naive, hand_loop(model, ids, [0, 0], 1.0))
    set_iterations(model, None, step_size=0.5)
    assert iteration_info(model)["iterations"] == 4 and iteration_info(model)["step_size"] == 0.5
    with torch.no_grad():
        assert torch.equal(model(ids), hand_loop(model, ids, [0] * 4, 0.5))


def test_pre_norm_steps_of_size_beta_equal_unit_steps_from_smaller_embeddings():
    """Why step L/n and step 1 give close losses on pre-norm RMS models: every branch reads a
    normalised input and the final norm removes the scale, so n steps of size beta from the
    embeddings e end where n unit steps from e / beta do (exactly but for the norms' eps);
    beta only changes the weight of the embeddings against the updates."""
    model = shared_llama(norm_eps=1e-12)
    ids = tokens(2, 9)
    set_iterations(model, 2)
    with torch.no_grad():
        scaled = model(ids)
    torch.testing.assert_close(scaled, hand_loop(model, ids, [0, 0], 1.0, start_scale=0.5), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(scaled, hand_loop(model, ids, [0, 0], 1.0), atol=1e-3)


def test_defaults_are_bit_exact_with_the_plain_model():
    """A shared model at n = L, beta = 1 computes exactly an unshared model holding L copies of its
    block, with and without autograd, and after switching iterations back and forth."""
    shared = shared_llama(groups=2)
    plain = build_model(shared.config.replace(share_layers=False, share_groups=None)).eval()
    state = {}
    for name, t in shared.state_dict().items():
        parts = name.split(".")
        if parts[:2] == ["decoder", "blocks"]:
            for layer in range(2 * int(parts[2]), 2 * int(parts[2]) + 2):
                state[".".join(["decoder", "blocks", str(layer), *parts[3:]])] = t
        else:
            state[name] = t
    plain.load_state_dict(state, strict=True)
    ids = tokens(2, 11)
    with torch.no_grad():
        reference = plain(ids)
        assert torch.equal(shared(ids), reference)
        set_iterations(shared, 2)
        assert not torch.allclose(shared(ids), reference)
        set_iterations(shared, 4, step_size=1.0)  # the trained schedule, spelt out
        assert torch.equal(shared(ids), reference)
        set_iterations(shared, 6)
        set_iterations(shared, None)
        assert torch.equal(shared(ids), reference)
    assert torch.equal(shared(ids), plain(ids))  # the autograd path too
    set_iterations(plain, None)
    set_iterations(plain, 4, step_size=1)  # no-ops on an unshared model
    with torch.no_grad():
        assert torch.equal(plain(ids), reference)


def test_grouped_checkpoint_names_and_old_configs(tmp_path):
    model = shared_llama(layers=6, groups=3)
    blocks = sorted({k.split(".")[2] for k in model.state_dict() if k.startswith("decoder.blocks.")})
    assert blocks == ["0", "1", "2"]
    save_model(model, tmp_path / "ckpt")
    loaded, ckpt = load_model(tmp_path / "ckpt")
    ckpt.close()
    ids = tokens(1, 5)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(ids), model(ids))
    old = {k: v for k, v in shared_llama().config.to_dict().items() if k != "share_groups"}
    config = ModelConfig.from_dict(old)  # a config.json written before share_groups existed
    assert config.share_layers and config.shared_blocks == 1 and config.blocks_in_stack("decoder") == 1
    grouped = ModelConfig.from_preset("llama-tiny", n_layers=6, share_groups=3)
    assert grouped.share_layers and grouped.shared_blocks == 3


def test_flops_count_every_block_application():
    model = shared_llama(layers=4)
    block = distinct_block_parameters(model)
    assert applied_block_parameters(model) == 4 * block
    assert iterations.flops_per_token(model) == model_flops_per_token(model) + 6.0 * 3 * block
    set_iterations(model, 2)
    assert applied_block_parameters(model) == 2 * block
    set_iterations(model, None)


# -- generation ----------------------------------------------------------------------------------
@pytest.mark.parametrize("iterations", [2, 8])
def test_cached_generation_at_other_iterations_equals_the_uncached_forward(iterations):
    model = shared_llama(seed=3)
    set_iterations(model, iterations)
    prompt = tokens(2, 6, seed=4)
    out, _ = generate(model, prompt, max_new_tokens=8)
    seq = prompt
    with torch.no_grad():
        for _ in range(8):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
        assert torch.equal(out, seq[:, prompt.shape[1]:])
        assert len(set(out.flatten().tolist())) > 2
        # Logits step by step, from a cache allocated for the trained depth (resized on first use)
        # and from one allocated for the current schedule.
        full = model(seq)
        for cache in (KVCache.allocate(model.config, 2, seq.shape[1]), KVCache.for_model(model, 2, seq.shape[1])):
            logits = [prefill(model, prompt, cache)]
            for t in range(prompt.shape[1], seq.shape[1] - 1):
                logits.append(decode_one_token(model, seq[:, t : t + 1], cache))
            assert len(cache.keys) == iterations
            torch.testing.assert_close(torch.stack(logits, 1), full[:, prompt.shape[1] - 1 : -1], atol=1e-5, rtol=1e-5)


def test_encoder_decoder_generation_at_fewer_iterations():
    config = ModelConfig.from_preset("t5-tiny", n_layers=4, n_decoder_layers=4, share_layers=True, init_std=0.05)
    torch.manual_seed(0)
    model = build_model(config).eval()
    set_iterations(model, 2)
    source = tokens(2, 7, vocab=512)
    out, _ = generate(model, source, max_new_tokens=6)
    seq = torch.full((2, 1), config.start_token_id, dtype=torch.long)
    with torch.no_grad():
        for _ in range(6):
            seq = torch.cat([seq, model(source, decoder_input_ids=seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq[:, 1:])


def test_a_filled_cache_refuses_another_schedule():
    model = shared_llama()
    cache = KVCache.allocate(model.config, 1, 8)
    prefill(model, tokens(1, 3), cache)
    set_iterations(model, 2)
    with pytest.raises(ValueError, match="set the iterations before generating"):
        decode_one_token(model, tokens(1, 1), cache)


# -- errors --------------------------------------------------------------------------------------
@pytest.mark.parametrize("make, args, message", [
    (lambda: shared_llama(), (0,), "iterations must be an integer >= 1"),
    (lambda: shared_llama(), (2, 0.0), "step size must be a finite number > 0"),
    (lambda: shared_llama(), (2, float("nan")), "step size must be a finite number > 0"),
    (lambda: shared_llama(groups=2), (3,), "not a multiple of share_groups 2"),
    (lambda: build_model(ModelConfig.from_preset("llama-tiny")), (1,), "need a parameter-shared model"),
    (lambda: build_model(ModelConfig.from_preset("llama-tiny")), (None, 2.0), "needs a parameter-shared model"),
    (lambda: build_model(ModelConfig.from_preset("bert-tiny", share_layers=True)), (1,), "needs a pre-norm model"),
    (lambda: build_model(ModelConfig.from_preset("t5-tiny", n_decoder_layers=4, share_layers=True)), (2,), "different depths"),
])
def test_bad_schedules_raise_user_errors(make, args, message):
    model = make()
    with pytest.raises(UserError, match=message):
        set_iterations(model, *args)


def test_post_norm_truncation_with_unit_steps_is_allowed():
    model = build_model(ModelConfig.from_preset("bert-tiny", share_layers=True))
    set_iterations(model, 1, step_size=1.0)
    assert iteration_info(model)["iterations"] == 1


def test_bad_share_groups_are_config_errors():
    with pytest.raises(UserError, match="not a multiple of share_groups 3"):
        ModelConfig.from_preset("llama-tiny", n_layers=4, share_groups=3)
    with pytest.raises(UserError, match="share_groups must be >= 1"):
        ModelConfig.from_preset("llama-tiny", share_groups=0)


# -- step-robust pre-training --------------------------------------------------------------------
def test_robust_schedule_is_a_pure_function_of_seed_step_and_micro_batch():
    assert iterations.default_robust_iterations(12, 1) == [12, 9, 6]
    assert iterations.default_robust_iterations(12, 3) == [12, 9, 6]
    assert iterations.default_robust_iterations(12, 2) == [12, 10, 6]
    assert iterations.default_robust_iterations(4, 4) == [4]
    choices = [12, 9, 6]
    run = [iterations.sampled_iterations(choices, 0, step, micro) for step in range(60) for micro in range(2)]
    assert run == [iterations.sampled_iterations(choices, 0, step, micro) for step in range(60) for micro in range(2)]
    assert set(run) == set(choices)
    assert run != [iterations.sampled_iterations(choices, 1, step, micro) for step in range(60) for micro in range(2)]


@pytest.fixture(scope="module")
def work(tmp_path_factory, stdlib_text, sp_tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("shared-ode")
    tok = sp_tokenizer.save(root / "tok")
    prepare(stdlib_text, sp_tokenizer, root / "shards", progress=False)
    return {"tok": tok, "shards": root / "shards"}


def _cfg(work, out: Path, **kw) -> stage.PretrainConfig:
    base = dict(out=out, data=work["shards"], preset="llama-tiny", tokenizer=work["tok"], seq_len=16, batch_size=4,
                max_steps=6, lr=3e-3, eval_batches=2, log_every=1, progress=False, share_layers=True,
                model={"n_layers": 4, "d_model": 32, "n_heads": 2, "n_kv_heads": 2, "d_ff": 64})
    return stage.PretrainConfig(**{**base, **kw})


def test_step_robust_pretraining_resumes_exactly_and_evaluates_each_count(work, tmp_path):
    # A constant rate, so that a 3-step run extended to 6 steps is an interrupted 6-step run.
    kw = dict(step_robust=True, grad_accum=2, eval_every=3, eval_iterations="4,2", schedule="constant")
    full = stage.run(_cfg(work, tmp_path / "full", **kw))
    assert full["robust_iterations"] == [4, 3, 2]
    train = [r for r in read_metrics(tmp_path / "full") if r["kind"] == "train"]
    expected = [sum(iterations.sampled_iterations([4, 3, 2], 0, step, m) for m in range(2)) / 2 for step in range(6)]
    assert [r["iterations"] for r in train] == pytest.approx(expected)
    assert len(set(expected)) > 1
    evals = [r for r in read_metrics(tmp_path / "full") if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [3, 6]
    assert all(r["loss_iter4"] == r["loss"] and r["loss_iter2"] != r["loss"] for r in evals)
    assert full["final_eval_loss_by_iterations"] == {4: evals[-1]["loss"], 2: evals[-1]["loss_iter2"]}

    stage.run(_cfg(work, tmp_path / "resumed", **{**kw, "max_steps": 3}))
    assert [p.name for p in state_dirs(tmp_path / "resumed")] == ["step-00000003"]
    resumed = stage.run(_cfg(work, tmp_path / "resumed", resume=True, **kw))
    assert resumed["resumed_from"] == 3
    a, ca = load_model(tmp_path / "full" / "checkpoint")
    b, cb = load_model(tmp_path / "resumed" / "checkpoint")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    ca.close(), cb.close()
    records = lambda run: [(r["kind"], r["step"], r["loss"], r.get("iterations")) for r in read_metrics(run)]  # noqa: E731
    assert records(tmp_path / "resumed") == records(tmp_path / "full")

    plain = stage.run(_cfg(work, tmp_path / "plain", **{**kw, "step_robust": False}))
    assert plain["final_train_loss"] != full["final_train_loss"]  # the sampled steps changed training
    assert "iterations" not in read_metrics(tmp_path / "plain")[0]


@pytest.mark.parametrize("extra, message", [
    (["--step-robust"], "needs a parameter-shared model"),
    (["--share-groups", "3"], "not a multiple of share_groups 3"),
    (["--share-groups", "2", "--eval-iterations", "3"], "not a multiple of share_groups 2"),
    (["--share-layers", "--robust-iterations", "4,2"], "needs step_robust"),
    (["--share-layers", "--step-robust", "--robust-iterations", "4,x"], "option robust_iterations (command line) expects a list of integers"),
    (["--share-layers", "--eval-iterations", "0"], "iterations must be an integer >= 1"),
    (["--eval-iterations", "2"], "need a parameter-shared model"),
    (["--share-layers", "--set", "model.share_layers=false"], "contradicts model.share_layers"),
])
def test_bad_options_are_one_line_exit_2_and_nothing_written(work, tmp_path, extra, message):
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'preset = "llama-tiny"\ndata = "{work["shards"]}"\ntokenizer = "{work["tok"]}"\nseq_len = 16\n'
                      'max_steps = 2\n[model]\nn_layers = 4\n')
    result = RUNNER.invoke(app, ["pretrain", str(recipe), str(tmp_path / "out"), *extra])
    assert result.exit_code == 2, result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1 and message in result.stderr
    assert not (tmp_path / "out").exists()


def test_sharing_options_with_an_init_checkpoint_are_refused(work, tmp_path):
    save_model(shared_llama(), tmp_path / "init", tokenizer_dir=work["tok"])
    with pytest.raises(UserError, match="apply to a preset"):
        stage.run(_cfg(work, tmp_path / "out", preset=None, init=tmp_path / "init", model={}, share_layers=True))
    assert not (tmp_path / "out").exists()


def test_grouped_teacher_gives_a_distilled_student_its_blocks():
    from cpmctl.distill import student_from_teacher

    teacher = shared_llama(layers=6, groups=3)
    student = student_from_teacher(teacher, [0, 3, 5])  # teacher blocks 0, 1, 2
    assert not student.config.share_layers and student.config.n_layers == 3
    t, s = teacher.state_dict(), student.state_dict()
    for i in range(3):
        assert torch.equal(s[f"decoder.blocks.{i}.ffn.w_in.weight"], t[f"decoder.blocks.{i}.ffn.w_in.weight"])
    ids = tokens(1, 5)
    set_iterations(teacher, 3)
    with torch.no_grad():  # three applications of the three blocks at unit steps = the student
        set_iterations(teacher, 3, step_size=1.0)
        assert torch.equal(student.eval()(ids), teacher(ids))


def test_recipe_keys_drive_grouped_step_robust_pretraining(work, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'preset = "llama-tiny"\ndata = "{work["shards"]}"\ntokenizer = "{work["tok"]}"\nseq_len = 16\n'
                      'batch_size = 4\nmax_steps = 2\nlog_every = 1\neval_batches = 1\nshare_groups = 2\nstep_robust = true\n'
                      'robust_iterations = [4, 2]\neval_iterations = [2]\n[model]\nn_layers = 4\nd_model = 32\n'
                      'n_heads = 2\nn_kv_heads = 2\nd_ff = 64\n')
    result = RUNNER.invoke(app, ["pretrain", str(recipe), str(tmp_path / "out")])
    assert result.exit_code == 0, result.stderr
    model, ckpt = load_model(tmp_path / "out" / "checkpoint")
    ckpt.close()
    assert model.config.shared_blocks == 2 and len(model.decoder.blocks) == 2
    evals = [r for r in read_metrics(tmp_path / "out") if r["kind"] == "eval"]
    assert "loss_iter2" in evals[-1]
    assert all(r["iterations"] in (2.0, 4.0) for r in read_metrics(tmp_path / "out") if r["kind"] == "train")


def test_infer_iterations_equal_generate_at_those_iterations_and_report_the_speedup(tmp_path, sp_tokenizer):
    model = shared_llama(layers=4, vocab_size=sp_tokenizer.vocab_size)
    save_model(model, tmp_path / "m", tokenizer_dir=sp_tokenizer.save(tmp_path / "tok"))
    runner = CliRunner()
    result = runner.invoke(app, ["infer", str(tmp_path / "m"), "Return the number", "--max-new-tokens", "5",
                                 "--iterations", "2", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)["result"]
    assert data["stats"]["iterations"]["iterations"] == 2 and data["stats"]["layer_speedup"] == 2.0
    ids = [model.config.bos_token_id] + sp_tokenizer.encode("Return the number")
    set_iterations(model, 2)
    expected, _ = generate(model, torch.tensor([ids]), max_new_tokens=5, eos_token_id=model.config.eos_token_id)
    row = expected[0].tolist()
    row = row[: row.index(model.config.eos_token_id)] if model.config.eos_token_id in row else row
    assert data["outputs"][0]["generated"] == sp_tokenizer.decode(row)
    for args in (["--iterations", "0"], ["--step-size", "-1"]):
        bad = runner.invoke(app, ["infer", str(tmp_path / "m"), "x", *args])
        assert bad.exit_code == 2 and len([ln for ln in bad.stderr.splitlines() if ln.strip()]) == 1, bad.output
