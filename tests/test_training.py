"""The shared training core (cpmctl.training): schedules, accumulation, trainable subsets,
keep-the-best/early stopping, 2 processes == 1 process, and kill + --resume == uninterrupted."""

from __future__ import annotations

import dataclasses

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cpmctl.checkpoint import SafetensorsFile, load_model
from cpmctl.config import ModelConfig
from cpmctl.data import make_batches, prepare
from cpmctl.errors import UserError
from cpmctl.losses import lm_forward, lm_loss
from cpmctl.model import build_model
from cpmctl.training import TrainConfig, Trainer, lr_at, read_metrics
from cpmctl.training_state import state_dirs

ROOT = Path(__file__).resolve().parents[1]
CPMCTL = [sys.executable, "-m", "cpmctl.cli"]


# One torch thread: on a small shared machine two spinning OpenMP threads are far slower.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def shards(tmp_path_factory, stdlib_text, sp_tokenizer) -> Path:
    out = tmp_path_factory.mktemp("train") / "shards"
    prepare(stdlib_text, sp_tokenizer, out, progress=False)
    return out


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, sp_tokenizer) -> Path:
    return sp_tokenizer.save(tmp_path_factory.mktemp("train") / "tok")


def _model(seed: int = 0):
    torch.manual_seed(seed)
    return build_model(ModelConfig.from_preset("llama-tiny", vocab_size=1000, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64))


def _loss(model, batch):
    return lm_loss(lm_forward(model, batch), batch["labels"]), {}


def _cfg(out: Path, **kw) -> TrainConfig:
    return TrainConfig(out=out, **{"max_steps": 6, "lr": 3e-3, "progress": False, "max_grad_norm": None, **kw})


# -- schedules -----------------------------------------------------------------------------------
def test_lr_schedules_warm_up_then_decay():
    base = dict(out=Path("x"), max_steps=10, lr=1.0, warmup_steps=2)
    lin, cos, const = (TrainConfig(**base, schedule=s) for s in ("linear", "cosine", "constant"))
    assert [lr_at(s, lin) for s in range(2)] == [0.5, 1.0]
    assert lr_at(2, lin) == 1.0 and lr_at(6, lin) == pytest.approx(0.5) and lr_at(10, lin) == 0.0
    assert lr_at(6, cos) == pytest.approx(0.5) and lr_at(4, cos) == pytest.approx(0.5 * (1 + 0.7071067811865476))
    assert lr_at(9, const) == 1.0
    floor = TrainConfig(**base, schedule="linear", min_lr_ratio=0.1)
    assert lr_at(10, floor) == pytest.approx(0.1)


@pytest.mark.parametrize("kw", [dict(max_steps=0), dict(optimizer="sgd"), dict(schedule="step"), dict(grad_accum=0),
                                dict(mixed_precision="fp8"), dict(best_mode="up"), dict(restore_best=True)])
def test_bad_train_config_is_a_user_error(kw):
    with pytest.raises(UserError):
        TrainConfig(out=Path("x"), **{"max_steps": 5, **kw})


# -- the loop ---------------------------------------------------------------------------------------
def test_gradient_accumulation_equals_one_big_batch(tmp_path, shards, sp_tokenizer):
    results = []
    for batch_size, accum in ((8, 1), (4, 2)):
        model = _model()
        data = make_batches(shards, sp_tokenizer, objective="causal", batch_size=batch_size, seq_len=16)
        Trainer(_cfg(tmp_path / f"b{batch_size}", grad_accum=accum)).fit(model, _loss, data)
        results.append(model.state_dict())
    for name in results[0]:
        torch.testing.assert_close(results[0][name], results[1][name], rtol=1e-4, atol=1e-5)  # fp32 sums in another order


def test_only_the_trainable_set_changes_and_has_optimizer_state(tmp_path, shards, sp_tokenizer):
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = make_batches(shards, sp_tokenizer, objective="causal", batch_size=4, seq_len=16)
    Trainer(_cfg(tmp_path / "run", optimizer="adafactor")).fit(model, _loss, data, trainable=["lm_head", "decoder.final_norm"])
    changed = {k for k in before if not torch.equal(before[k], model.state_dict()[k])}
    assert changed == {"lm_head.proj.weight", "decoder.final_norm.weight"}
    state = state_dirs(tmp_path / "run")[-1]
    optim = json.loads((state / "optimizer.json").read_text())
    assert set(optim["state"]) == {"lm_head.proj.weight", "decoder.final_norm.weight"}
    with SafetensorsFile(state / "model.safetensors") as fh:  # frozen weights are not stored
        assert fh.names() == ["decoder.final_norm.weight", "lm_head.proj.weight"]
        assert torch.equal(fh.get("lm_head.proj.weight"), model.state_dict()["lm_head.proj.weight"])


def test_a_step_bumps_the_version_of_every_trained_weight(tmp_path, shards, sp_tokenizer):
    """The fused AdamW kernel writes weights without bumping their version counters; the Trainer
    bumps them, so caches keyed on a weight's version (MoE fill outputs) see each update."""
    model = _model()
    params = dict(model.named_parameters())
    before = {k: p._version for k, p in params.items()}
    data = make_batches(shards, sp_tokenizer, objective="causal", batch_size=4, seq_len=16)
    Trainer(_cfg(tmp_path / "run", max_steps=2, optimizer="adamw")).fit(model, _loss, data, trainable=["lm_head"])
    assert params["lm_head.proj.weight"]._version >= before["lm_head.proj.weight"] + 2
    assert params["decoder.final_norm.weight"]._version == before["decoder.final_norm.weight"]


def test_keep_the_best_and_early_stopping(tmp_path, shards, sp_tokenizer):
    scripted = iter([3.0, 2.0, 2.5, 2.4, 1.0])
    best_calls = []
    data = make_batches(shards, sp_tokenizer, objective="causal", batch_size=4, seq_len=16)
    result = Trainer(_cfg(tmp_path / "run", max_steps=50, eval_every=2, best_metric="score", patience=2)).fit(
        _model(), _loss, data, eval_fn=lambda m: {"score": next(scripted)},
        on_best=lambda m, step, metrics: best_calls.append((step, metrics["score"])))
    assert result.stopped_early and result.step == 8
    assert best_calls == [(2, 3.0), (4, 2.0)] and result.best == {"step": 4, "metrics": {"score": 2.0}}
    evals = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "eval"]
    assert [r["score"] for r in evals] == [3.0, 2.0, 2.5, 2.4]


def test_restore_best_returns_the_best_evaluated_weights(tmp_path, shards, sp_tokenizer):
    scripted = iter([3.0, 2.0, 2.5, 2.4, 1.0])
    snapshots = []

    def eval_fn(module):
        snapshots.append({k: v.detach().clone() for k, v in module.named_parameters()})
        return {"score": next(scripted)}

    model = _model()
    data = make_batches(shards, sp_tokenizer, objective="causal", batch_size=4, seq_len=16)
    cfg = _cfg(tmp_path / "run", max_steps=50, eval_every=2, best_metric="score", patience=2, restore_best=True)
    result = Trainer(cfg).fit(model, _loss, data, eval_fn=eval_fn, trainable=["lm_head"])
    assert result.stopped_early and result.step == 8 and result.best["step"] == 4
    assert not torch.equal(snapshots[1]["lm_head.proj.weight"], snapshots[3]["lm_head.proj.weight"])  # it kept training
    for name, param in model.named_parameters():  # the 2nd evaluation's (step 4) weights, trained and frozen alike
        assert torch.equal(param, snapshots[1][name]), name
    with SafetensorsFile(tmp_path / "run" / "best.safetensors") as fh:
        assert fh.names() == ["lm_head.proj.weight"]


def test_a_new_run_drops_an_earlier_best_file(tmp_path, shards, sp_tokenizer):
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.safetensors").write_bytes(b"stale")
    data = make_batches(shards, sp_tokenizer, objective="causal", batch_size=4, seq_len=16)
    cfg = _cfg(run, max_steps=2, eval_every=1, best_metric="score", restore_best=True, keep_state="none")
    scores = iter([1.0, 2.0])
    result = Trainer(cfg).fit(_model(), _loss, data, eval_fn=lambda m: {"score": next(scores)})
    assert result.best["step"] == 1
    with SafetensorsFile(run / "best.safetensors") as fh:
        assert "lm_head.proj.weight" in fh.names()


def test_metrics_count_tokens_and_flops(tmp_path, shards, sp_tokenizer):
    model = _model()
    data = make_batches(shards, sp_tokenizer, objective="causal", batch_size=4, seq_len=16)
    result = Trainer(_cfg(tmp_path / "run", max_steps=3, log_every=1)).fit(
        model, lambda m, b: (_loss(m, b)[0], {"flops": 1000.0, "extra": 2.0}), data, flops_per_token=10.0)
    assert result.tokens == 3 * 4 * 16
    assert result.flops == 3 * (4 * 16 * 10.0 + 1000.0)
    records = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "train"]
    assert [r["step"] for r in records] == [1, 2, 3] and all(r["extra"] == pytest.approx(2.0) for r in records)


# -- training states ---------------------------------------------------------------------------------
def _noisy_loss(model, batch):
    """The LM loss scaled by draws from torch's, numpy's and Python's generators, so a resume that
    did not restore every RNG state trains differently."""
    import numpy as np

    scale = 1.0 + 0.1 * float(torch.rand(())) + 0.05 * random.random() + 0.05 * float(np.random.rand())
    return _loss(model, batch)[0] * scale, {}


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with SafetensorsFile(path) as fh:
        return {k: v.clone() for k, v in fh.state_dict().items()}


def test_state_is_pickle_free_and_resumes_exactly(tmp_path, shards, sp_tokenizer):
    trainable = ["lm_head", "decoder.final_norm", "decoder.layers.1"]  # a subset, with the fused AdamW
    kw = dict(max_steps=6, checkpoint_every=3, keep_state="all", weight_decay=0.1, warmup_steps=2, schedule="cosine", log_every=1)
    data = lambda: make_batches(shards, sp_tokenizer, objective="causal", batch_size=4, seq_len=16)  # noqa: E731
    full = _model()
    Trainer(_cfg(tmp_path / "full", **kw)).fit(full, _noisy_loss, data(), trainable=trainable)
    assert [p.name for p in state_dirs(tmp_path / "full")] == ["step-00000003", "step-00000006"]
    for state in state_dirs(tmp_path / "full"):
        files = sorted(p.name for p in state.iterdir())
        assert files == ["checksums.json", "model.safetensors", "optimizer.json", "optimizer.safetensors", "rng.json",
                         "rng.safetensors", "trainer.json"]

    # Resume a copy of the run from step 3: a new process in all but name (fresh model and seed).
    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "state" / "step-00000006")
    resumed = _model(seed=1)  # the trainable weights come from the state; the frozen ones must match
    resumed.load_state_dict({k: v for k, v in full.state_dict().items() if not k.startswith(tuple(trainable))}, strict=False)
    result = Trainer(_cfg(tmp_path / "resumed", resume=True, **kw)).fit(resumed, _noisy_loss, data(), trainable=trainable)
    assert result.resumed_from == 3
    a, b = full.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    for name in ("model.safetensors", "optimizer.safetensors", "rng.safetensors"):
        want = _tensors(tmp_path / "full" / "state" / "step-00000006" / name)
        got = _tensors(tmp_path / "resumed" / "state" / "step-00000006" / name)
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), name
    records = lambda run: [(r["kind"], r["step"], r["loss"]) for r in read_metrics(run)]  # noqa: E731
    assert records(tmp_path / "resumed") == records(tmp_path / "full")


def test_without_rng_restore_the_noisy_run_differs(tmp_path, shards, sp_tokenizer):
    """The exactness test above can fail: the same two runs with the RNG draws shifted differ."""
    data = lambda: make_batches(shards, sp_tokenizer, objective="causal", batch_size=4, seq_len=16)  # noqa: E731
    a, b = _model(), _model()
    Trainer(_cfg(tmp_path / "a", max_steps=2)).fit(a, _noisy_loss, data())
    trainer = Trainer(_cfg(tmp_path / "b", max_steps=2))
    torch.rand(())  # one draw more than run a
    trainer.fit(b, _noisy_loss, data())
    assert not all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("keep_state, left", [("last", ["step-00000004"]), ("all", ["step-00000003", "step-00000004"]), ("none", None)])
def test_keep_state_after_a_completed_run(tmp_path, shards, sp_tokenizer, keep_state, left):
    data = make_batches(shards, sp_tokenizer, objective="causal", batch_size=4, seq_len=16)
    Trainer(_cfg(tmp_path / "run", max_steps=4, checkpoint_every=1, keep_checkpoints=2, keep_state=keep_state)).fit(_model(), _loss, data)
    if left is None:
        assert not (tmp_path / "run" / "state").exists()
    else:
        assert [p.name for p in state_dirs(tmp_path / "run")] == left
        assert [p.name for p in (tmp_path / "run" / "state").iterdir() if p.name.startswith(".")] == []


def test_extending_a_completed_run_equals_the_longer_run(tmp_path, shards, sp_tokenizer):
    data = lambda: make_batches(shards, sp_tokenizer, objective="causal", batch_size=4, seq_len=16)  # noqa: E731
    long, short = _model(), _model()
    Trainer(_cfg(tmp_path / "long", max_steps=5, schedule="constant")).fit(long, _noisy_loss, data())
    Trainer(_cfg(tmp_path / "short", max_steps=3, schedule="constant")).fit(short, _noisy_loss, data())
    extended = _model(seed=1)
    result = Trainer(_cfg(tmp_path / "short", max_steps=5, schedule="constant", resume=True)).fit(extended, _noisy_loss, data())
    assert result.resumed_from == 3 and result.step == 5
    assert all(torch.equal(x, y) for x, y in zip(long.state_dict().values(), extended.state_dict().values()))


# -- processes --------------------------------------------------------------------------------------
def _recipe(tmp_path: Path, shards: Path, tok_dir: Path, **extra) -> Path:
    values = {"preset": "llama-tiny", "data": str(shards), "tokenizer": str(tok_dir), "seq_len": 32, "batch_size": 8,
              "max_steps": 6, "lr": 3e-3, "log_every": 1, "eval_every": 3, "eval_batches": 2, "weight_decay": 0.01,
              "warmup_steps": 2, "schedule": "cosine", **extra}
    lines = [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    path = tmp_path / "recipe.toml"
    path.write_text("# test recipe\n" + "\n".join(lines) + "\n")
    return path


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _run_in_process(recipe: Path, out: Path, **overrides) -> dict:
    """The reference run, in this process (one torch thread, like the OMP_NUM_THREADS=1 children)."""
    from cpmctl.recipes import apply_recipe, load_recipe
    from cpmctl.stages import pretrain

    return pretrain.run(apply_recipe(pretrain.PretrainConfig, load_recipe(recipe), out=out, progress=False, **overrides))


def _weights(run: Path) -> dict[str, torch.Tensor]:
    model, ckpt = load_model(run / "checkpoint")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ckpt.close()
    return state


def test_two_cpu_processes_equal_one_with_the_same_global_batch(tmp_path, shards, tok_dir):
    recipe = _recipe(tmp_path, shards, tok_dir)
    _run_in_process(recipe, tmp_path / "one")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29731", "-m", "cpmctl.cli"]
    two = subprocess.run([*launcher, "pretrain", str(recipe), str(tmp_path / "two")], capture_output=True, text=True,
                         env=_env(), timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    for name in a:
        # Two processes sum the gradient in another order than one. Adam divides each update by
        # the gradient's running RMS, so for an embedding row of a token seen once or twice (a
        # gradient near 0) that last-bit difference grows to ~5e-5 on some CPUs (seen on an Intel
        # Xeon VM, not on an AMD EPYC one); a wrong batch split or lost gradient moves far more.
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=2e-4)
    losses = lambda run: [r["loss"] for r in read_metrics(run) if r["kind"] == "train"]  # noqa: E731
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
    state = json.loads((tmp_path / "two" / "state" / "step-00000006" / "rng.json").read_text())
    assert len(state["ranks"]) == 2  # rank 0 wrote both processes' generator states

    # Both processes read the kept final state: extending each run by 2 steps keeps them equal.
    _run_in_process(recipe, tmp_path / "one", resume=True, max_steps=8)
    more = subprocess.run([*launcher, "pretrain", str(recipe), str(tmp_path / "two"), "--resume", "--set", "max_steps=8"],
                          capture_output=True, text=True, env=_env(), timeout=600)
    assert more.returncode == 0, more.stderr[-3000:]
    assert [p.name for p in state_dirs(tmp_path / "two")] == ["step-00000008"]
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=2e-4)
    assert len(losses(tmp_path / "two")) == 8 and losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)


def _fsdp_launcher(port: int) -> list[str]:
    """accelerate launch with the FSDP2 config of recipes/, through the test-only entry point that
    lets accelerate shard on CPU processes (tests/fsdp_on_cpu.py says what it changes)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "recipes" / "accelerate-fsdp.yaml"),
            "--num_processes", "2", "--main_process_port", str(port), str(ROOT / "tests" / "fsdp_on_cpu.py")]


def test_fsdp_processes_equal_one_and_their_states_resume_anywhere(tmp_path, shards, tok_dir):
    """2 FSDP processes (each holding half of every layer) train like 1 process with the same
    global batch; a killed FSDP run's state resumes in 1 process, and that process's state
    resumes under FSDP again, ending where the uninterrupted 1-process run ends."""
    # A constant rate after warm-up, so that the in-between session may stop at any step.
    recipe = _recipe(tmp_path, shards, tok_dir, max_steps=8, checkpoint_every=2, keep_checkpoints=1, batch_size=4,
                     grad_accum=2, schedule="constant", eval_every=0, eval_batches=0)
    _run_in_process(recipe, tmp_path / "one")

    run = tmp_path / "fsdp"
    proc = subprocess.Popen([*_fsdp_launcher(29741), "pretrain", str(recipe), str(run)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=_env())
    deadline = time.monotonic() + 300
    while not state_dirs(run) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    # torch's launcher starts each worker in a session of its own: kill the workers by their ids.
    workers = [int(pid) for pid in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
    for pid in [*workers, proc.pid]:
        os.kill(pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL and len(workers) == 2
    killed_at = int(state_dirs(run)[-1].name.split("-")[1])
    assert killed_at < 8 and not (run / "checkpoint").exists()
    shapes = lambda state: {k: tuple(v.shape) for k, v in _tensors(state / "model.safetensors").items()}  # noqa: E731
    assert shapes(state_dirs(run)[-1]) == shapes(state_dirs(tmp_path / "one")[-1])  # whole tensors, not shards

    # FSDP state -> 1 process (one step more), then that state -> FSDP again (to the end).
    assert _run_in_process(recipe, run, resume=True, max_steps=killed_at + 1)["resumed_from"] == killed_at
    resumed = subprocess.run([*_fsdp_launcher(29742), "pretrain", str(recipe), str(run), "--resume"],
                             capture_output=True, text=True, env=_env(), timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [p.name for p in state_dirs(run)] == ["step-00000008"]
    a, b = _weights(tmp_path / "one"), _weights(run)
    assert a.keys() == b.keys()
    for name in a:
        # fp32 sums in another order; Adam turns such noise in a near-zero gradient into up to
        # lr-sized steps of a few elements (of 10^5), so atol is lr / 30 rather than 1e-5.
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-4)
    train = lambda r: [(x["step"], x["loss"], x["grad_norm"]) for x in read_metrics(r) if x["kind"] == "train"]  # noqa: E731
    assert [s for s, _, _ in train(run)] == list(range(1, 9))  # every step once, across three sessions
    for (_, loss_a, norm_a), (_, loss_b, norm_b) in zip(train(tmp_path / "one"), train(run)):
        assert loss_b == pytest.approx(loss_a, rel=1e-5) and norm_b == pytest.approx(norm_a, rel=1e-4)


def test_killed_run_resumes_bit_exactly(tmp_path, shards, tok_dir):
    recipe = _recipe(tmp_path, shards, tok_dir, max_steps=16, checkpoint_every=4, eval_every=2, eval_batches=4, keep_checkpoints=3)
    _run_in_process(recipe, tmp_path / "full")

    run = tmp_path / "killed"
    proc = subprocess.Popen([*CPMCTL, "pretrain", str(recipe), str(run)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    deadline = time.monotonic() + 300
    while not (run / "state" / "step-00000004").is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (run / "checkpoint").exists()
    resumed = subprocess.run([*CPMCTL, "pretrain", str(recipe), str(run), "--resume"], capture_output=True, text=True, env=_env())
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["resumed_from"] >= 4
    a, b = _weights(tmp_path / "full"), _weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # The log is continuous: every step once, same losses as the uninterrupted run.
    records = lambda r: [(x["kind"], x["step"], x["loss"]) for x in read_metrics(r)]  # noqa: E731
    assert records(run) == records(tmp_path / "full")


def test_resume_without_state_and_restart_over_a_run_are_errors(tmp_path, shards, tok_dir):
    from typer.testing import CliRunner

    from cpmctl.cli import app

    recipe = _recipe(tmp_path, shards, tok_dir, max_steps=2)
    result = CliRunner().invoke(app, ["pretrain", str(recipe), str(tmp_path / "none"), "--resume"])
    assert result.exit_code == 2 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert not (tmp_path / "none").exists()
    _run_in_process(recipe, tmp_path / "done")
    result = CliRunner().invoke(app, ["pretrain", str(recipe), str(tmp_path / "done")])
    assert result.exit_code == 2 and "--resume" in result.stderr and "--force" in result.stderr


@pytest.mark.parametrize("kind, fsdp2, allow_fsdp, message", [
    ("DEEPSPEED", False, True, "use DDP or FSDP"), ("MEGATRON_LM", False, True, "use DDP or FSDP"),
    ("FSDP", False, True, "fsdp_version: 2"), ("FSDP", True, False, "pretrain` only")])
def test_deepspeed_megatron_and_fsdp1_are_refused(monkeypatch, tmp_path, kind, fsdp2, allow_fsdp, message):
    """Engines whose states cpmctl cannot gather into whole tensors, and FSDP in a stage that does not
    save through full_state_dict(): one-line UserError (exit 2)."""
    import accelerate
    from accelerate.utils import DistributedType

    class Engine:  # what Trainer reads of an Accelerator set up for `kind` (this machine has neither engine)
        def __init__(self, **kwargs):
            self.distributed_type, self.is_fsdp2, self.is_main_process = DistributedType[kind], fsdp2, True

    monkeypatch.setattr(accelerate, "Accelerator", Engine)
    with pytest.raises(UserError, match=message):
        Trainer(dataclasses.replace(_cfg(tmp_path / "run"), allow_fsdp=allow_fsdp))
