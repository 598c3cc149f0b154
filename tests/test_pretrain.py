"""`cpmctl pretrain` with knowledge inheritance: KI loss against a hand computation, a_t
schedules, teachers of other sizes, the tokenizer check, the top-K teacher cache, recipes."""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from typer.testing import CliRunner

from cpmctl.checkpoint import save_model
from cpmctl.cli import app
from cpmctl.config import ModelConfig
from cpmctl.data import prepare
from cpmctl.errors import UserError
from cpmctl.losses import kd_loss, kd_loss_topk, ki_loss, ki_weight, lm_forward, teacher_topk
from cpmctl.model import build_model
from cpmctl.recipes import apply_recipe, load_recipe, parse_override
from cpmctl.stages import pretrain as stage
from cpmctl.training import read_metrics

ROOT = Path(__file__).resolve().parents[1]
RUNNER = CliRunner()


# One torch thread: on a small shared machine two spinning OpenMP threads are far slower.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -- losses against a hand computation ----------------------------------------------------------------
def _softmax(v):
    e = [math.exp(x - max(v)) for x in v]
    return [x / sum(e) for x in e]


def test_ki_loss_matches_a_hand_computation():
    student = torch.tensor([[[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [2.0, 2.0, 2.0]]])
    teacher = torch.tensor([[[0.5, 2.5, -1.0], [1.0, 0.0, 2.0], [9.0, 9.0, 9.0]]])
    labels = torch.tensor([[1, 2, -100]])  # the third position is not a target
    T, a = 2.0, 0.3
    ce, kl = [], []
    for pos, label in ((0, 1), (1, 2)):
        s, t = student[0, pos].tolist(), teacher[0, pos].tolist()
        ce.append(-math.log(_softmax(s)[label]))
        ps, pt = _softmax([x / T for x in s]), _softmax([x / T for x in t])
        kl.append(sum(q * math.log(q / p) for q, p in zip(pt, ps)))
    expected = (1 - a) * sum(ce) / 2 + a * T * T * sum(kl) / 2
    loss, stats = ki_loss(student, labels, teacher, a, T)
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert stats["lm"] == pytest.approx(sum(ce) / 2, rel=1e-6) and stats["kd"] == pytest.approx(T * T * sum(kl) / 2, rel=1e-6)
    assert float(ki_loss(student, labels, None, 0.0, T)[0]) == pytest.approx(sum(ce) / 2, rel=1e-6)


def test_the_ki_temperature_default_is_declared_once():
    """The losses take the temperature their caller means (no default of their own); the KI
    default is the command's, T = 1 (BENCHMARKS.md "Knowledge inheritance")."""
    for fn in (kd_loss, kd_loss_topk, ki_loss):
        assert inspect.signature(fn).parameters["temperature"].default is inspect.Parameter.empty
    with pytest.raises(TypeError, match="temperature"):
        ki_loss(torch.zeros(1, 2, 3), torch.tensor([[0, 1]]), None, 0.0)
    cfg = stage.PretrainConfig(out=Path("o"), data=Path("d"))
    assert cfg.ki_temperature == 1.0


def test_teacher_with_other_vocabulary_sizes():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, 8, generator=g)
    mask = torch.ones(2, 5, dtype=torch.bool)
    small = torch.randn(2, 5, 6, generator=g)  # teacher vocab 6 < 8: zero probability on ids 6, 7
    pt = torch.softmax(small / 2, -1)
    ps = torch.log_softmax(student / 2, -1)[..., :6]
    expected = 4 * (pt * (pt.log() - ps)).sum(-1).mean()
    torch.testing.assert_close(kd_loss(student, small, mask, 2.0), expected)
    padded = torch.cat([student, torch.randn(2, 5, 4, generator=g)], -1)  # teacher vocab 12 > 8: cut to 8
    torch.testing.assert_close(kd_loss(student, padded, mask, 2.0), torch.zeros(()), atol=1e-6, rtol=0)


def test_top_k_loss_is_kl_to_the_renormalised_top_k():
    g = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(1, 4, 20, generator=g), torch.randn(1, 4, 20, generator=g) * 3
    mask = torch.tensor([[True, False, True, True]])
    ids, values = teacher_topk(teacher, 5)
    assert torch.equal(ids, teacher.topk(5, -1).indices)
    q = torch.softmax(values[mask] / 2, -1)
    log_ps = torch.log_softmax(student[mask] / 2, -1).gather(-1, ids[mask])
    expected = 4 * (q * (q.log() - log_ps)).sum(-1).mean()
    torch.testing.assert_close(kd_loss_topk(student, ids, values, mask, 2.0), expected)
    # K = vocabulary: the top-K loss is the full KL.
    ids, values = teacher_topk(teacher, 20)
    torch.testing.assert_close(kd_loss_topk(student, ids, values, mask, 2.0), kd_loss(student, teacher, mask, 2.0), rtol=1e-5, atol=1e-6)


def test_ki_weight_schedules():
    assert [ki_weight(t, 4) for t in range(6)] == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    assert [ki_weight(t, 3, "step") for t in range(5)] == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert [ki_weight(t, 3, "constant", 0.4) for t in range(5)] == [0.4, 0.4, 0.4, 0.0, 0.0]
    assert ki_weight(0, 0) == 0.0
    with pytest.raises(UserError):
        ki_weight(0, 3, "cosine")


# -- the stage ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def work(tmp_path_factory, stdlib_text, sp_tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pretrain")
    tok = sp_tokenizer.save(root / "tok")
    prepare(stdlib_text, sp_tokenizer, root / "shards", progress=False)
    torch.manual_seed(1)
    # A teacher narrower, shallower and with a larger (padded) vocabulary than the student.
    teacher = build_model(ModelConfig.from_preset("llama-tiny", vocab_size=1024, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, n_layers=1))
    save_model(teacher, root / "teacher", tokenizer_dir=tok)
    return {"root": root, "tok": tok, "shards": root / "shards", "teacher": root / "teacher"}


def _cfg(work, out: Path, **kw) -> stage.PretrainConfig:
    base = dict(out=out, data=work["shards"], preset="llama-tiny", tokenizer=work["tok"], seq_len=16, batch_size=4,
                max_steps=4, lr=3e-3, eval_batches=2, log_every=1, progress=False)
    return stage.PretrainConfig(**{**base, **kw})


@pytest.mark.parametrize("preset, objective", [("t5-tiny", "span"), ("bert-tiny", "mlm"), ("llama-tiny", "causal")])
def test_each_architecture_trains_with_its_objective(work, tmp_path, preset, objective):
    cfg = _cfg(work, tmp_path / preset, preset=preset, max_steps=6)
    result = stage.run(cfg)
    train = [r["loss"] for r in read_metrics(tmp_path / preset) if r["kind"] == "train"]
    assert len(train) == 6 and train[-1] < train[0]
    assert stage.make_data(cfg, _tok(work), _config(tmp_path / preset)).objective == objective
    assert result["final_eval_loss"] < math.log(1000) + 0.5


def _tok(work):
    from cpmctl.tokenizer import load_tokenizer

    return load_tokenizer(work["tok"])


def _config(run: Path):
    from cpmctl.checkpoint import read_config

    return read_config(run / "checkpoint")


def test_ki_with_a_smaller_teacher_counts_its_flops(work, tmp_path):
    result = stage.run(_cfg(work, tmp_path / "ki", teacher=work["teacher"], ki_steps=2))
    records = [r for r in read_metrics(tmp_path / "ki") if r["kind"] == "train"]
    assert [r["a_t"] for r in records] == [1.0, 0.5, 0.0, 0.0]
    assert "kd" in records[0] and "kd" not in records[3]
    from cpmctl.checkpoint import load_model
    from cpmctl.training import forward_flops_per_token, model_flops_per_token

    student, c1 = load_model(tmp_path / "ki" / "checkpoint")
    teacher, c2 = load_model(work["teacher"])
    tokens_per_step = 4 * 16
    expected = 4 * tokens_per_step * model_flops_per_token(student) + 2 * tokens_per_step * forward_flops_per_token(teacher)
    assert result["flops"] == pytest.approx(expected)
    c1.close(), c2.close()


def test_teacher_cache_gives_the_online_top_k_and_is_reused(work, tmp_path, sp_tokenizer):
    from cpmctl.checkpoint import load_model

    cfg = _cfg(work, tmp_path / "c1", teacher=work["teacher"], ki_steps=3, teacher_cache=tmp_path / "cache", teacher_cache_k=4)
    stage.run(cfg)
    meta = json.loads((tmp_path / "cache" / "meta.json").read_text())
    assert meta["micro_batches"] == 3 and meta["fingerprint"]["k"] == 4
    assert isinstance(np.load(tmp_path / "cache" / "ids.npy", mmap_mode="r"), np.memmap)
    # Cached batches carry exactly the online teacher's top-K, so the KI loss is the same.
    teacher, ckpt = load_model(work["teacher"])
    student = build_model(ModelConfig.from_preset("llama-tiny", vocab_size=1000))
    online = stage.make_data(cfg, sp_tokenizer, student.config)
    cached = stage.CachedTeacherBatches(stage.make_data(cfg, sp_tokenizer, student.config), tmp_path / "cache")
    for _ in range(3):
        a, b = next(online), next(cached)
        with torch.no_grad():
            t_logits, s_logits = lm_forward(teacher, a), lm_forward(student, a)
        mask = a["labels"] != -100
        ids, values = teacher_topk(t_logits, 4, 1000)
        assert torch.equal(b["teacher_ids"][mask], ids[mask])
        assert torch.equal(b["teacher_logits"][mask], values[mask])
        online_loss = ki_loss(s_logits, a["labels"], (ids, values), 0.7, 2.0)[0]
        cached_loss = ki_loss(s_logits, b["labels"], (b["teacher_ids"], b["teacher_logits"]), 0.7, 2.0)[0]
        assert float(online_loss) == float(cached_loss)
    assert "teacher_ids" not in next(cached)  # past the cached steps
    ckpt.close()
    # A second run reuses the cache (no rebuild) and trains identically.
    before = (tmp_path / "cache" / "ids.npy").stat().st_mtime_ns
    stage.run(_cfg(work, tmp_path / "c2", teacher=work["teacher"], ki_steps=3, teacher_cache=tmp_path / "cache", teacher_cache_k=4))
    assert (tmp_path / "cache" / "ids.npy").stat().st_mtime_ns == before
    w1, c1 = load_model(tmp_path / "c1" / "checkpoint")
    w2, c2 = load_model(tmp_path / "c2" / "checkpoint")
    assert all(torch.equal(w1.state_dict()[k], w2.state_dict()[k]) for k in w1.state_dict())
    c1.close(), c2.close()
    with pytest.raises(UserError, match="other settings"):
        stage.run(_cfg(work, tmp_path / "c3", teacher=work["teacher"], ki_steps=3, teacher_cache=tmp_path / "cache", teacher_cache_k=5))
    assert not (tmp_path / "c3").exists()


def test_a_teacher_with_another_tokenizer_is_refused(work, tmp_path, stdlib_text):
    from cpmctl.tokenizer import train_sentencepiece

    train_sentencepiece(stdlib_text, tmp_path / "tok400", 400, sentinels=0)
    teacher = build_model(ModelConfig.from_preset("llama-tiny", vocab_size=400))
    save_model(teacher, tmp_path / "teacher", tokenizer_dir=tmp_path / "tok400")
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'preset = "llama-tiny"\ndata = "{work["shards"]}"\ntokenizer = "{work["tok"]}"\nseq_len = 16\nmax_steps = 2\n')
    result = RUNNER.invoke(app, ["pretrain", str(recipe), str(tmp_path / "out"), "--teacher", str(tmp_path / "teacher")])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "different tokenizer" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, message", [
    (["--set", "nonsense=1"], "unknown option"),
    (["--data", "/nonexistent/shards"], "not a directory of token shards"),
    (["--ki-schedule", "cosine", "--teacher", "TEACHER"], "unknown KI schedule"),
    (["--teacher-cache", "/tmp/x"], "needs --teacher"),
    (["--set", "optimizer=sgd"], "unknown optimizer"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(work, tmp_path, extra, message):
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'preset = "llama-tiny"\ndata = "{work["shards"]}"\ntokenizer = "{work["tok"]}"\nseq_len = 16\nmax_steps = 2\n')
    extra = [str(work["teacher"]) if e == "TEACHER" else e for e in extra]
    result = RUNNER.invoke(app, ["pretrain", str(recipe), str(tmp_path / "out"), *extra])
    assert result.exit_code == 2, result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1 and message in result.stderr
    assert not (tmp_path / "out").exists()


# -- recipes ----------------------------------------------------------------------------------------
def test_every_recipe_loads_and_names_its_command():
    recipes = sorted((ROOT / "recipes").glob("*.toml"))
    assert recipes
    for path in recipes:
        first = path.read_text(encoding="utf-8").splitlines()[0]
        assert first.startswith("# cpmctl ") and path.name in first
        values = load_recipe(path)
        command = first.split()[1]
        if command == "pretrain":
            model = {k[6:]: values.pop(k) for k in list(values) if k.startswith("model.")}
            cfg = apply_recipe(stage.PretrainConfig, values, {"model": model} if model else {}, out=Path("x"))
            assert cfg.max_steps >= 1


def test_overrides_parse_toml_values():
    assert parse_override("lr=3e-4") == ("lr", 3e-4)
    assert parse_override("model.d_model=512") == ("model.d_model", 512)
    assert parse_override("teacher=runs/t") == ("teacher", "runs/t")
    assert parse_override("resume=true") == ("resume", True)
    with pytest.raises(UserError):
        parse_override("no-equals")
