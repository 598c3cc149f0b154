"""MixKD: student construction, mixup, augmentation, loss terms, teacher-logits cache, the stage."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cpmctl import distill
from cpmctl.config import ModelConfig
from cpmctl.errors import UserError
from cpmctl.model import build_model


def _teacher(preset: str, layers: int = 4, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    changes = {"n_layers": layers, **overrides}
    if preset == "t5-tiny":
        changes.setdefault("n_decoder_layers", layers)
    return build_model(ModelConfig.from_preset(preset, **changes)).eval()


def _ids(batch: int = 3, length: int = 7, vocab: int = 512, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g)


# -- layer selection -------------------------------------------------------------------------
def test_every_other_layer_keeps_the_top_layer():
    assert distill.every_other_layer(6, 3) == [1, 3, 5]
    assert distill.every_other_layer(12, 6) == [1, 3, 5, 7, 9, 11]
    assert distill.every_other_layer(6, 6) == [0, 1, 2, 3, 4, 5]
    assert distill.every_other_layer(6, 1) == [5]
    assert distill.parse_layers("3", 6) == [1, 3, 5]
    assert distill.parse_layers("0,2,4", 6) == [0, 2, 4]
    assert distill.parse_layers("4,", 6) == [4]  # a one-element list, not a count


@pytest.mark.parametrize("spec, message", [
    ("7", "1..6 layers"), ("0", "1..6 layers"), ("0,6", "out of range"), ("-1,2", "out of range"),
    ("3,1", "increasing"), ("1,1", "increasing"), ("a,b", "comma-separated"), (",", "no layer"),
])
def test_bad_layer_specs_are_user_errors(spec, message):
    with pytest.raises(UserError, match=message):
        distill.parse_layers(spec, 6)


# -- student from teacher --------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["bert-tiny", "llama-tiny", "t5-tiny"])
def test_student_with_all_layers_equals_teacher(preset):
    teacher = _teacher(preset, layers=3)
    student = distill.student_from_teacher(teacher, [0, 1, 2])
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    kwargs = {"decoder_input_ids": _ids(3, 4, seed=1)} if preset == "t5-tiny" else {}
    with torch.no_grad():
        assert torch.equal(student(ids, mask, **kwargs), teacher(ids, mask, **kwargs))
    # The student owns its tensors: training it must not write into the teacher.
    for (name, s), t in zip(student.state_dict().items(), teacher.state_dict().values()):
        assert s.data_ptr() != t.data_ptr(), name


def test_every_other_selection_copies_the_right_blocks():
    teacher = _teacher("bert-tiny", layers=4)
    student = distill.student_from_teacher(teacher, distill.every_other_layer(4, 2))
    assert student.config.n_layers == 2
    t_state, s_state = teacher.state_dict(), student.state_dict()
    for name, tensor in s_state.items():
        if name.startswith("encoder.blocks."):
            i = int(name.split(".")[2])
            teacher_name = name.replace(f"encoder.blocks.{i}.", f"encoder.blocks.{[1, 3][i]}.", 1)
            assert torch.equal(tensor, t_state[teacher_name]), name
        else:
            assert torch.equal(tensor, t_state[name]), name
    # Forward: the teacher's embeddings then its blocks 1 and 3, nothing else.
    ids = _ids()
    with torch.no_grad():
        x = teacher.embed(ids)
        for i, layer in enumerate([1, 3]):
            x = teacher.encoder.block(layer)(x, layer=i, self_mask=None, causal=False, rotary=None, cache=None, memory=None, cross_mask=None)
        assert torch.equal(student(ids), teacher.logits(x))


def test_encoder_decoder_student_selects_each_stack():
    teacher = _teacher("t5-tiny", layers=4)
    student = distill.student_from_teacher(teacher, [0, 3], decoder_layers=[2])
    assert (student.config.n_layers, student.config.n_decoder_layers) == (2, 1)
    t_state = teacher.state_dict()
    assert torch.equal(student.state_dict()["encoder.blocks.1.attn.qkv.weight"], t_state["encoder.blocks.3.attn.qkv.weight"])
    assert torch.equal(student.state_dict()["decoder.blocks.0.cross_attn.kv.weight"], t_state["decoder.blocks.2.cross_attn.kv.weight"])
    with pytest.raises(UserError, match="out of range"):
        distill.student_from_teacher(teacher, [0, 1], decoder_layers=[4])


def test_moe_layers_are_renamed_with_their_blocks():
    moe = {"experts": 2, "expert_size": 64, "top_k": 1, "layers": ["encoder.1", "encoder.3"]}
    teacher = _teacher("bert-tiny", layers=4, moe=moe)
    student = distill.student_from_teacher(teacher, [0, 3])
    assert student.config.moe.layers == ["encoder.1"]


def test_preset_student_takes_the_teacher_vocabulary():
    teacher = _teacher("bert-tiny").config.replace(vocab_size=700)
    student = distill.student_from_preset("bert-tiny", teacher)
    assert student.config.vocab_size == 700
    assert student.embed.tokens.weight.shape[0] == 700


# -- mixup -----------------------------------------------------------------------------------
def test_lambda_one_gives_the_originals_exactly():
    torch.manual_seed(0)
    embeds = torch.randn(4, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]])
    perm = torch.tensor([1, 2, 3, 0])
    pad = torch.randn(8)
    mixed, mixed_mask = distill.mix_batch(embeds, mask, perm, torch.ones(4), pad)
    assert torch.equal(mixed, embeds)
    labels = torch.tensor([0, 2, 1, 2])
    assert torch.equal(distill.mixed_labels(labels, perm, torch.ones(4), 3), F.one_hot(labels, 3).float())
    # lambda = 0 gives the partner exactly.
    mixed0, _ = distill.mix_batch(embeds, mask, perm, torch.zeros(4), pad)
    assert torch.equal(mixed0, embeds[perm])


def test_mix_interpolates_pads_and_takes_the_union_mask():
    a = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    b = -torch.ones(2, 5, 2)
    mask_a = torch.tensor([[1, 1, 0], [1, 1, 1]])
    mask_b = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    pad = torch.tensor([10.0, 20.0])
    lam = torch.tensor([0.25, 0.5])
    mixed, mask = distill.mix_embeddings(a, mask_a, b, mask_b, lam, pad)
    assert mixed.shape == (2, 5, 2)
    # Position 0 of row 0: 0.25 * a + 0.75 * b; position 4: a is padded with the pad embedding.
    assert torch.allclose(mixed[0, 0], 0.25 * a[0, 0] + 0.75 * b[0, 0])
    assert torch.allclose(mixed[0, 4], 0.25 * pad + 0.75 * b[0, 4])
    assert torch.allclose(mixed[1, 2], 0.5 * a[1, 2] + 0.5 * b[1, 2])
    assert mask.tolist() == [[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]


def test_mixed_labels_are_the_interpolated_distribution():
    labels = torch.tensor([0, 1, 2])
    perm = torch.tensor([2, 0, 1])
    lam = torch.tensor([0.7, 0.5, 0.1])
    y = distill.mixed_labels(labels, perm, lam, 4)
    expected = torch.tensor([[0.7, 0, 0.3, 0], [0.5, 0.5, 0, 0], [0, 0.9, 0.1, 0]])
    assert torch.allclose(y, expected)
    assert torch.allclose(y.sum(-1), torch.ones(3))
    # A pair with itself (same class) keeps a one-hot label.
    assert torch.equal(distill.mixed_labels(labels, torch.arange(3), lam, 4), F.one_hot(labels, 4).float())


def test_beta_sampling_is_seeded_and_symmetric():
    first = distill.sample_lambdas(np.random.default_rng(5), 0.4, 2000)
    second = distill.sample_lambdas(np.random.default_rng(5), 0.4, 2000)
    assert torch.equal(first, second)
    assert float(first.min()) >= 0 and float(first.max()) <= 1
    assert abs(float(first.mean()) - 0.5) < 0.03
    # Beta(a, a) with a < 1 piles up near 0 and 1.
    assert float(((first < 0.1) | (first > 0.9)).float().mean()) > 0.4
    perm = distill.sample_pairs(np.random.default_rng(1), 10)
    assert sorted(perm.tolist()) == list(range(10))
    with pytest.raises(UserError, match=r"Beta\(a, a\) needs a > 0") as info:
        distill.sample_lambdas(np.random.default_rng(0), 0.0, 3)
    assert info.value.option == "mixup_alpha"


# -- augmentation ----------------------------------------------------------------------------
def test_perturbation_keeps_specials_and_is_seeded():
    ids = [101] + list(range(200, 260)) + [102]
    options = dict(vocab_size=300, special_ids={0, 101, 102, 103}, mask_id=103, mask_prob=0.2, replace_prob=0.2)
    out = distill.perturb_tokens(ids, np.random.default_rng(3), **options)
    again = distill.perturb_tokens(ids, np.random.default_rng(3), **options)
    assert out == again and len(out) == len(ids)
    assert out[0] == 101 and out[-1] == 102
    changed = [(o, n) for o, n in zip(ids, out) if o != n]
    masked = sum(1 for _, n in changed if n == 103)
    replaced = [n for _, n in changed if n != 103]
    assert 3 <= masked <= 25 and 3 <= len(replaced) <= 25
    assert all(n not in options["special_ids"] for n in replaced)
    unchanged = distill.perturb_tokens(ids, np.random.default_rng(3), **{**options, "mask_prob": 0.0, "replace_prob": 0.0})
    assert unchanged == ids
    rows, labels = distill.augment_examples([ids, ids[:5]], [1, 2], 2, seed=0, **options)
    assert labels == [1, 2, 1, 2] and len(rows) == 4 and rows[0] != rows[2]


# -- loss terms ------------------------------------------------------------------------------
def _log_softmax(row):
    m = max(row)
    z = math.log(sum(math.exp(v - m) for v in row)) + m
    return [v - z for v in row]


def test_each_loss_term_matches_a_hand_computation():
    s = torch.tensor([[1.0, -0.5, 0.3], [0.2, 0.1, -1.0]])
    t = torch.tensor([[2.0, 0.0, -1.0], [-0.3, 0.8, 0.4]])
    s_mix = torch.tensor([[0.5, 0.5, 0.0], [1.5, -0.5, 0.2]])
    t_mix = torch.tensor([[0.1, 0.9, -0.2], [1.0, 0.0, 0.0]])
    labels = torch.tensor([0, 2])
    y_mix = torch.tensor([[0.6, 0.0, 0.4], [0.0, 0.3, 0.7]])
    temp = 2.0

    ce = -(_log_softmax(s[0].tolist())[0] + _log_softmax(s[1].tolist())[2]) / 2

    def kd(student, teacher):
        total = 0.0
        for srow, trow in zip(student.tolist(), teacher.tolist()):
            ls, lt = _log_softmax([v / temp for v in srow]), _log_softmax([v / temp for v in trow])
            total += sum(math.exp(b) * (b - a) for a, b in zip(ls, lt))
        return total / len(student) * temp * temp

    smix = -sum(sum(y * l for y, l in zip(yrow, _log_softmax(srow))) for yrow, srow in zip(y_mix.tolist(), s_mix.tolist())) / 2
    weights = distill.LossWeights(ce=0.5, kd=2.0, mix=3.0, smix=0.25)
    loss, terms = distill.mixkd_loss(weights, temp, student=s, labels=labels, teacher=t, student_mix=s_mix, teacher_mix=t_mix, targets_mix=y_mix)
    assert terms["ce"] == pytest.approx(ce, rel=1e-6)
    assert terms["kd"] == pytest.approx(kd(s, t), rel=1e-5)
    assert terms["mix"] == pytest.approx(kd(s_mix, t_mix), rel=1e-5)
    assert terms["smix"] == pytest.approx(smix, rel=1e-6)
    assert float(loss) == pytest.approx(0.5 * ce + 2.0 * kd(s, t) + 3.0 * kd(s_mix, t_mix) + 0.25 * smix, rel=1e-5)
    # KD of a student equal to its teacher is 0; terms with weight 0 are not computed.
    assert float(distill.kd_loss(t, t, temp)) == pytest.approx(0.0, abs=1e-7)
    _, only_ce = distill.mixkd_loss(distill.LossWeights(ce=1, kd=0, mix=0, smix=0), temp, student=s, labels=labels)
    assert set(only_ce) == {"ce"}


def test_loss_weights_are_checked():
    with pytest.raises(UserError, match=">= 0"):
        distill.LossWeights(kd=-1)
    with pytest.raises(UserError, match="nothing to train"):
        distill.LossWeights(ce=0, kd=0, mix=0, smix=0)
    assert not distill.LossWeights(mix=0, smix=0).needs_mixup
    assert distill.LossWeights(kd=0, mix=0, smix=1).needs_mixup and not distill.LossWeights(kd=0, mix=0, smix=1).needs_teacher


# -- teacher-logits cache --------------------------------------------------------------------
def test_cache_round_trip_and_staleness(tmp_path):
    logits = np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32)
    rows = [[1, 2, 3], [4, 5]]
    key = distill.examples_hash(rows)
    assert key != distill.examples_hash([[1, 2], [3, 4, 5]])  # boundaries count
    cache = distill.TeacherLogitsCache.build(tmp_path / "c", logits, teacher="t1", examples=key)
    assert len(cache) == 10
    assert torch.equal(cache.get([3, 0, 9]), torch.from_numpy(logits[[3, 0, 9]]))
    assert isinstance(cache.logits, np.memmap)
    with pytest.raises(UserError, match="another teacher"):
        distill.TeacherLogitsCache.open(tmp_path / "c", teacher="t2", examples=key)
    with pytest.raises(UserError, match="other training examples"):
        distill.TeacherLogitsCache.open(tmp_path / "c", teacher="t1", examples="x")
    with pytest.raises(UserError, match="not a teacher-logits cache"):
        distill.TeacherLogitsCache.open(tmp_path, teacher="t1", examples=key)


def test_mixed_lm_cross_entropy_matches_a_hand_computation():
    from cpmctl.distill import mixed_lm_cross_entropy

    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5)
    a = torch.tensor([[1, 2, -100], [0, 4, 4]])
    b = torch.tensor([[3, -100, -100], [2, 2, 1]])
    lam = torch.tensor([0.3, 1.0])
    logp = torch.log_softmax(logits, -1)
    total, count = 0.0, 0
    for i in range(2):
        for t in range(3):
            if a[i, t] == -100 and b[i, t] == -100:
                continue
            count += 1
            if a[i, t] != -100:
                total -= float(lam[i]) * float(logp[i, t, a[i, t]])
            if b[i, t] != -100:
                total -= (1 - float(lam[i])) * float(logp[i, t, b[i, t]])
    assert float(mixed_lm_cross_entropy(logits, a, b, lam)) == pytest.approx(total / count, rel=1e-6)


# =============================================================================================
# The stage (tiny models, a task built from the stdlib corpus)
# =============================================================================================
from typer.testing import CliRunner  # noqa: E402

from cpmctl.cli import app  # noqa: E402

runner = CliRunner()


@pytest.fixture(autouse=True)
def _drop_cli_log_handlers():
    """The CLI points the "cpmctl" logger at the runner's stream, which closes after each call."""
    yield
    import logging

    logging.getLogger("cpmctl").handlers[:] = []


def _cli(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def task_files(tmp_path_factory, stdlib_text):
    """A 3-class task: the length of a stdlib docstring line (short / medium / long)."""
    import json

    lines = [line for line in stdlib_text.read_text().splitlines() if line.strip()][:150]
    root = tmp_path_factory.mktemp("task")

    def label(text):
        n = len(text.split())
        return "short" if n < 8 else ("medium" if n < 20 else "long")

    for name, chunk in (("train", lines[:96]), ("dev", lines[96:128])):
        with open(root / f"{name}.jsonl", "w") as fh:
            for text in chunk:
                fh.write(json.dumps({"text": " ".join(text.split()[:40]), "label": label(text)}) + "\n")
    return root


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory, sp_tokenizer):
    """A 2-layer bert-tiny with the session's sentencepiece tokenizer (vocabulary 1000)."""
    from cpmctl.checkpoint import save_model

    torch.manual_seed(0)
    tok_dir = tmp_path_factory.mktemp("tokdir") / "tok"
    sp_tokenizer.save(tok_dir)
    model = build_model(ModelConfig.from_preset("bert-tiny", vocab_size=sp_tokenizer.vocab_size, n_layers=2))
    out = tmp_path_factory.mktemp("ckpt") / "bert"
    save_model(model, out, tokenizer_dir=tok_dir)
    return out


FAST = ["--max-length", 48, "--batch-size", 8, "--lr", 1e-3, "--seed", 3]


@pytest.fixture(scope="module")
def fine_tuned_teacher(tmp_path_factory, base_checkpoint, task_files):
    """The teacher: the base checkpoint fine-tuned with a linear head (no teacher terms)."""
    out = tmp_path_factory.mktemp("teacher") / "run"
    result = _cli("distill", out, "--teacher", base_checkpoint, "--train", task_files / "train.jsonl",
                  "--student-layers", 2, "--kd-weight", 0, "--mix-weight", 0, "--max-steps", 8, *FAST)
    assert result.exit_code == 0, result.output
    return out


def test_fine_tuning_writes_a_task_model(fine_tuned_teacher, base_checkpoint):
    from cpmctl.checkpoint import verify_checkpoint
    from cpmctl.task_model import load_task_model

    ckpt = fine_tuned_teacher / "checkpoint"
    provenance = verify_checkpoint(ckpt)
    assert provenance["stage"] == "distill" and provenance["parents"][0]["path"].endswith("bert")
    tm = load_task_model(fine_tuned_teacher)  # a run directory resolves to its checkpoint
    assert tm.labels == ("long", "medium", "short") and tm.head is not None
    assert tm.model.config.n_layers == 2
    # Fine-tuning moved the backbone away from the base weights.
    base = load_task_model(base_checkpoint)
    assert tm.head is not None and base.head is None
    assert not torch.equal(tm.model.encoder.blocks[0].attn.qkv.weight, base.model.encoder.blocks[0].attn.qkv.weight)


def test_mixkd_run_trains_a_half_depth_student(tmp_path, fine_tuned_teacher, task_files):
    from cpmctl.task_model import load_task_model
    from cpmctl.training import read_metrics

    out = tmp_path / "mixkd"
    result = _cli("distill", out, "--teacher", fine_tuned_teacher, "--train", task_files / "train.jsonl",
                  "--dev", task_files / "dev.jsonl", "--smix-weight", 0.5, "--augment", 1, "--max-steps", 4,
                  "--eval-every", 2, *FAST)
    assert result.exit_code == 0, result.output
    student = load_task_model(out)
    assert student.model.config.n_layers == 1 and student.labels == ("long", "medium", "short")
    records = read_metrics(out)
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert {"loss_ce", "loss_kd", "loss_mix", "loss_smix"} <= set(train[-1])
    assert all(math.isfinite(train[-1][k]) for k in ("loss_ce", "loss_kd", "loss_mix", "loss_smix"))
    assert [r["step"] for r in evals] == [2, 4] and 0 <= evals[-1]["accuracy"] <= 1
    assert train[-1]["flops"] > 0  # the teacher's passes are counted


def test_keep_best_saves_the_best_dev_student_and_patience_stops(tmp_path, fine_tuned_teacher, task_files):
    from cpmctl import tasks
    from cpmctl.task_model import load_task_model
    from cpmctl.tokenizer import load_tokenizer
    from cpmctl.training import read_metrics

    out = tmp_path / "kd"
    result = _cli("distill", out, "--teacher", fine_tuned_teacher, "--train", task_files / "train.jsonl",
                  "--dev", task_files / "dev.jsonl", "--mix-weight", 0, "--max-steps", 40, "--eval-every", 1,
                  "--patience", 2, "--keep-best", "--lr", 3e-2, "--json", *FAST[:-4], "--seed", 3)
    assert result.exit_code == 0, result.output
    evals = [r for r in read_metrics(out) if r["kind"] == "eval"]
    best = max(evals, key=lambda r: r["accuracy"])  # the first of the best (later ties are no improvement)
    best = next(r for r in evals if r["accuracy"] == best["accuracy"])
    assert evals[-1]["step"] == best["step"] + 2 < 40  # stopped 2 evaluations without improvement past the best
    student = load_task_model(out)
    saved = json.loads((out / "checkpoint" / "task.json").read_text())["metrics"]
    assert saved["best_step"] == best["step"] and saved["dev_accuracy"] == best["accuracy"]
    # Re-scored, the saved student is the best evaluation's, not the last step's.
    tok = load_tokenizer(student.path / "tokenizer")
    rows, _ = tasks.encode_examples(tok, student.model.config, tasks.load_examples(task_files / "dev.jsonl"),
                                    tasks.LabelSet(student.labels, student.words), mode="linear", max_length=48)
    scorer = tasks.Scorer(student.model.float().eval(), head=student.head.eval())
    with torch.no_grad():
        again = tasks.evaluate(scorer, tasks.eval_batches(rows, 8, tok.pad_id), len(student.labels))
    assert again["accuracy"] == best["accuracy"] and again["loss"] == pytest.approx(best["loss"], abs=1e-5)
    assert again["loss"] != pytest.approx(evals[-1]["loss"], abs=1e-5)


def test_patience_and_keep_best_need_dev_evaluations(tmp_path, fine_tuned_teacher, task_files):
    train, dev = task_files / "train.jsonl", task_files / "dev.jsonl"
    for extra in (["--patience", 2, "--eval-every", 1], ["--keep-best", "--dev", dev], ["--patience", 0, "--dev", dev, "--eval-every", 1]):
        result = _cli("distill", tmp_path / "out", "--teacher", fine_tuned_teacher, "--train", train, *extra, "--max-steps", 1)
        assert result.exit_code == 2 and "error:" in result.output and "patience" in result.output, (extra, result.output)
        assert not (tmp_path / "out").exists()


def _objective_setup(fine_tuned_teacher, task_files):
    from cpmctl import tasks
    from cpmctl.distill import MixKDClassifier, TaskBatches
    from cpmctl.task_model import load_task_model
    from cpmctl.tokenizer import load_tokenizer

    tm = load_task_model(fine_tuned_teacher)
    tok = load_tokenizer(tm.path / "tokenizer")
    examples = tasks.load_examples(task_files / "train.jsonl")
    labels = tasks.LabelSet.from_examples(examples)
    rows, _ = tasks.encode_examples(tok, tm.model.config, examples, labels, mode="linear", max_length=48)
    teacher = tasks.Scorer(tm.model.float().eval(), head=tm.head.eval())
    student = MixKDClassifier(tasks.Scorer(distill.student_from_teacher(tm.model, [1]), head=tasks.LinearHead(64, 3))).eval()
    return tm, tok, rows, teacher, student, TaskBatches(rows, 8, tok.pad_id, seed=0)


def test_cache_gives_the_online_teachers_kd_loss(tmp_path, fine_tuned_teacher, task_files):
    from cpmctl.stages.distill import _teacher_cache

    tm, tok, rows, teacher, student, batches = _objective_setup(fine_tuned_teacher, task_files)
    cache = _teacher_cache(tmp_path / "cache", teacher, tm.identity, rows, tok.pad_id, 16, "cpu")
    assert len(cache) == len(rows)
    for (loss_online, stats_online), (loss_cached, stats_cached) in _online_and_cached(student, teacher, cache, batches):
        assert float(loss_cached) == pytest.approx(float(loss_online), rel=1e-6, abs=1e-7)
        assert stats_cached["loss_kd"] == pytest.approx(stats_online["loss_kd"], rel=1e-6, abs=1e-7)
        assert stats_online["flops"] > 0 and stats_cached["flops"] == 0  # the cache saved the teacher pass
    # A second open reuses it; another teacher or other examples are refused.
    again = _teacher_cache(tmp_path / "cache", teacher, tm.identity, rows, tok.pad_id, 16, "cpu")
    assert np.array_equal(np.asarray(again.logits), np.asarray(cache.logits))
    with pytest.raises(UserError, match="other training examples"):
        _teacher_cache(tmp_path / "cache", teacher, tm.identity, rows[:-1], tok.pad_id, 16, "cpu")



def _online_and_cached(student, teacher, cache, batches):
    """(online objective's (loss, stats), cached objective's) on batches 0..2 of epoch 1, CE + KD."""
    from cpmctl.distill import ClassificationObjective

    weights = distill.LossWeights(ce=0.5, kd=1.0, mix=0.0, smix=0.0)
    online = ClassificationObjective(weights, 2.0, 0.4, 0, 3, teacher=teacher, teacher_flops_per_token=1.0)
    cached = ClassificationObjective(weights, 2.0, 0.4, 0, 3, cache=cache)
    with torch.no_grad():
        return [(online(student, batches.batch_at(1, p)), cached(student, batches.batch_at(1, p))) for p in range(3)]

def test_mixed_objective_uses_both_models_on_the_same_mixture(fine_tuned_teacher, task_files):
    """The mixed-KD term equals KD between the two models run by hand on the mixed embeddings."""
    from cpmctl.distill import ClassificationObjective, mixup_draws

    tm, tok, rows, teacher, student, batches = _objective_setup(fine_tuned_teacher, task_files)
    weights = distill.LossWeights(ce=0, kd=0, mix=1.0, smix=0.0)
    objective = ClassificationObjective(weights, 2.0, 0.4, 7, 3, teacher=teacher)
    batch = batches.batch_at(0, 0)
    with torch.no_grad():
        _, stats = objective(student, batch)
        perm, lam = mixup_draws(7, (0, 0), 8, 0.4)

        def mixed_logits(scorer):
            words = scorer.model.embed.tokens(batch["input_ids"])
            pad = scorer.model.embed.tokens.weight[0]
            x, mask = distill.mix_batch(words, batch["attention_mask"], perm, lam, pad)
            text = ((batch["text_mask"] + batch["text_mask"][perm]) > 0).long()
            return scorer({**batch, "attention_mask": mask, "text_mask": text}, x)

        expected = distill.kd_loss(mixed_logits(student.scorer), mixed_logits(teacher), 2.0)
    assert stats["loss_mix"] == pytest.approx(float(expected), rel=1e-5)


def test_resume_continues_exactly(tmp_path, fine_tuned_teacher, task_files):
    from cpmctl.checkpoint import read_provenance

    common = ["--teacher", fine_tuned_teacher, "--train", task_files / "train.jsonl", "--smix-weight", 0.5,
              "--schedule", "constant", "--warmup-ratio", 0, "--checkpoint-every", 2, *FAST]
    straight = _cli("distill", tmp_path / "straight", *common, "--max-steps", 4)
    assert straight.exit_code == 0, straight.output
    first = _cli("distill", tmp_path / "resumed", *common, "--max-steps", 2)
    assert first.exit_code == 0, first.output
    second = _cli("distill", tmp_path / "resumed", *common, "--max-steps", 4, "--resume")
    assert second.exit_code == 0, second.output
    assert '"resumed_from": 2' in second.output
    a = read_provenance(tmp_path / "straight" / "checkpoint")["content_hash"]
    b = read_provenance(tmp_path / "resumed" / "checkpoint")["content_hash"]
    assert a == b


def test_bad_inputs_exit_2_and_write_nothing(tmp_path, fine_tuned_teacher, base_checkpoint, task_files, stdlib_text):
    from cpmctl.checkpoint import save_model
    from cpmctl.tokenizer import train_sentencepiece

    train = task_files / "train.jsonl"
    out = tmp_path / "out"
    cases = [
        (["--teacher", tmp_path / "missing", "--train", train], "does not exist"),
        (["--teacher", fine_tuned_teacher, "--train", tmp_path / "missing.jsonl"], "does not exist"),
        (["--teacher", fine_tuned_teacher, "--train", train, "--student-layers", "0,2"], "out of range"),
        (["--teacher", fine_tuned_teacher, "--train", train, "--student-layers", 3], "1..2 layers"),
        (["--teacher", base_checkpoint, "--train", train], "no task head"),
        (["--teacher", fine_tuned_teacher], "either --train"),
        (["--teacher", fine_tuned_teacher, "--train", train, "--mixup-alpha", 0], "mixup-alpha"),
    ]
    # A student checkpoint with another tokenizer.
    other_tok = train_sentencepiece(stdlib_text, tmp_path / "tok2", 900)
    model = build_model(ModelConfig.from_preset("bert-tiny", vocab_size=1000, n_layers=1))
    save_model(model, tmp_path / "other", tokenizer_dir=tmp_path / "tok2")
    assert other_tok.vocab_size == 900
    cases.append((["--teacher", fine_tuned_teacher, "--train", train, "--student", tmp_path / "other"], "different tokenizers"))
    for args, message in cases:
        result = _cli("distill", out, *args, "--max-steps", 1)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (args, result.output)
        assert not out.exists(), args


@pytest.mark.parametrize("preset", ["llama-tiny", "t5-tiny"])
def test_lm_distillation_on_a_corpus(tmp_path, preset, sp_tokenizer, stdlib_text):
    from cpmctl.checkpoint import save_model
    from cpmctl.data import prepare
    from cpmctl.task_model import load_task_model
    from cpmctl.training import read_metrics

    tok_dir = sp_tokenizer.save(tmp_path / "tok")
    torch.manual_seed(0)
    overrides = {"vocab_size": 1000, "n_layers": 2}
    teacher = build_model(ModelConfig.from_preset(preset, **overrides))
    save_model(teacher, tmp_path / "teacher", tokenizer_dir=tok_dir)
    prepare(stdlib_text, sp_tokenizer, tmp_path / "shards", progress=False)
    result = _cli("distill", tmp_path / "out", "--teacher", tmp_path / "teacher", "--data", tmp_path / "shards",
                  "--student-layers", 1, "--smix-weight", 0.5, "--seq-len", 32, "--batch-size", 4, "--max-steps", 2)
    assert result.exit_code == 0, result.output
    student = load_task_model(tmp_path / "out")
    assert student.model.config.n_layers == 1 and student.head is None
    last = [r for r in read_metrics(tmp_path / "out") if r["kind"] == "train"][-1]
    for term in ("loss_ce", "loss_kd", "loss_mix", "loss_smix"):
        assert math.isfinite(last[term]) and last[term] > 0, term


def test_prompt_tune_full_output_is_a_teacher(tmp_path, base_checkpoint, task_files):
    """`cpmctl prompt-tune --full --head linear` writes OUT/model + an adapter with the head."""
    from cpmctl.task_model import load_task_model

    pt = tmp_path / "pt"
    result = _cli("prompt-tune", base_checkpoint, pt, "--train", task_files / "train.jsonl", "--head", "linear", "--full",
                  "--max-steps", 2, "--batch-size", 8, "--eval-every", 2)
    assert result.exit_code == 0, result.output
    tm = load_task_model(pt)
    assert tm.path == pt / "model" and tm.labels == ("long", "medium", "short") and tm.head is not None
    out = tmp_path / "student"
    result = _cli("distill", out, "--teacher", pt, "--train", task_files / "train.jsonl", "--student-layers", 1,
                  "--max-steps", 1, *FAST)
    assert result.exit_code == 0, result.output
    assert load_task_model(out).model.config.n_layers == 1


# -- classification with label words (--head lm), as in prompt-tune ---------------------------------
LABEL_WORDS = {"long": "file", "medium": "value", "short": "name"}


@pytest.fixture(scope="module")
def lm_teachers(tmp_path_factory, sp_tokenizer, task_files):
    """Plain llama-tiny and t5-tiny checkpoints (2 layers, the session tokenizer) and a verbalizer
    of single-token words (decoder-only models score one token per class)."""
    import json

    from cpmctl.checkpoint import save_model

    root = tmp_path_factory.mktemp("lm_teachers")
    tok_dir = sp_tokenizer.save(root / "tok")
    (root / "words.json").write_text(json.dumps(LABEL_WORDS))
    out = {"verbalizer": root / "words.json"}
    for preset in ("llama-tiny", "t5-tiny"):
        torch.manual_seed(1)
        layers = {"n_layers": 2, **({"n_decoder_layers": 2} if preset == "t5-tiny" else {})}
        model = build_model(ModelConfig.from_preset(preset, vocab_size=sp_tokenizer.vocab_size, **layers))
        save_model(model, root / preset, tokenizer_dir=tok_dir)
        out[preset] = root / preset
    return out


def _direct_label_scores(model, row, label_ids):
    """log p(label word | input) by hand: decoder-only, the next token after the last position;
    encoder-decoder, the word's tokens teacher-forced from the start token, summed."""
    ids = torch.tensor([row.ids])
    if model.config.arch == "decoder":
        logp = model(ids)[0, -1].log_softmax(-1)
        return torch.stack([logp[word[0]] for word in label_ids])
    scores = []
    for word in label_ids:
        dec = torch.tensor([[model.config.start_token_id, *word[:-1]]])
        logp = model(ids, decoder_input_ids=dec)[0].log_softmax(-1)
        scores.append(sum(logp[j, t] for j, t in enumerate(word)))
    return torch.stack(scores)


@pytest.mark.parametrize("preset", ["llama-tiny", "t5-tiny"])
def test_lm_head_distillation_trains_and_scores_label_words(tmp_path, preset, lm_teachers, task_files, one_torch_thread):
    from cpmctl import tasks
    from cpmctl.task_model import load_task_model
    from cpmctl.tokenizer import load_tokenizer
    from cpmctl.training import read_metrics

    out = tmp_path / "student"
    # One batch holds the whole training set, so every step sees the same originals: their terms must fall.
    result = _cli("distill", out, "--teacher", lm_teachers[preset], "--train", task_files / "train.jsonl", "--dev",
                  task_files / "dev.jsonl", "--head", "lm", "--verbalizer", lm_teachers["verbalizer"], "--student-layers", 1,
                  "--smix-weight", 0.5, "--max-steps", 6, "--batch-size", 96, "--max-length", 32, "--lr", 3e-3,
                  "--schedule", "constant", "--warmup-ratio", 0, "--log-every", 1)
    assert result.exit_code == 0, result.output
    train = [r for r in read_metrics(out) if r["kind"] == "train"]
    assert len(train) == 6 and all(math.isfinite(train[-1][f"loss_{k}"]) for k in ("ce", "kd", "mix", "smix"))
    first, last = train[0]["loss_ce"] + train[0]["loss_kd"], train[-1]["loss_ce"] + train[-1]["loss_kd"]
    assert last < 0.9 * first, (first, last)

    student = load_task_model(out)
    assert student.scoring == "lm" and student.head is None and student.words == ("file", "value", "name")
    assert student.model.config.arch == {"llama-tiny": "decoder", "t5-tiny": "encoder-decoder"}[preset]
    # Its class scores are the LM head's log-probabilities of the label words, computed by hand.
    tok = load_tokenizer(student.path / "tokenizer")
    label_ids = tasks.label_token_ids(tok, student.words)
    assert all(len(w) == 1 for w in label_ids)
    examples = tasks.load_examples(task_files / "dev.jsonl")
    labels = tasks.LabelSet(student.labels, student.words)
    rows, _ = tasks.encode_examples(tok, student.model.config, examples, labels, mode="lm", max_length=32)
    model = student.model.float().eval()
    with torch.no_grad():
        got = tasks.Scorer(model, label_ids=label_ids)(tasks.collate(rows, tok.pad_id))
        by_hand = torch.stack([_direct_label_scores(model, row, label_ids) for row in rows])
    assert torch.allclose(got, by_hand, atol=1e-4)
    # The run's dev evaluation scored the same way: its accuracy is the hand-computed one.
    accuracy = float((by_hand.argmax(-1) == torch.tensor([r.label for r in rows])).float().mean())
    final_eval = [r for r in read_metrics(out) if r["kind"] == "eval"][-1]
    assert final_eval["accuracy"] == pytest.approx(accuracy)
    # The teacher's words are the default verbalizer of a student distilled from it.
    again = _cli("distill", tmp_path / "from_student", "--teacher", out, "--train", task_files / "train.jsonl", "--head", "lm",
                 "--student-layers", 1, "--max-steps", 1, "--batch-size", 32, "--max-length", 32)
    assert again.exit_code == 0, again.output
    assert load_task_model(tmp_path / "from_student").words == ("file", "value", "name")


@pytest.mark.parametrize("preset", ["llama-tiny", "t5-tiny"])
def test_lm_head_cache_gives_the_online_teachers_label_word_kd(tmp_path, preset, lm_teachers, task_files, one_torch_thread):
    from cpmctl import tasks
    from cpmctl.distill import MixKDClassifier, TaskBatches
    from cpmctl.stages.distill import _teacher_cache, teacher_key
    from cpmctl.task_model import load_task_model
    from cpmctl.tokenizer import load_tokenizer

    tm = load_task_model(lm_teachers[preset])
    tok = load_tokenizer(tm.path / "tokenizer")
    examples = tasks.load_examples(task_files / "train.jsonl")
    labels = tasks.LabelSet.from_examples(examples, LABEL_WORDS)
    label_ids = tasks.label_token_ids(tok, labels.words)
    rows, _ = tasks.encode_examples(tok, tm.model.config, examples, labels, mode="lm", max_length=32)
    teacher = tasks.Scorer(tm.model.float().eval(), label_ids=label_ids)
    student = MixKDClassifier(tasks.Scorer(distill.student_from_teacher(tm.model, [1], [1] if preset == "t5-tiny" else None),
                                           label_ids=label_ids)).eval()
    key = teacher_key(tm, label_ids)
    cache = _teacher_cache(tmp_path / "cache", teacher, key, rows, tok.pad_id, 16, "cpu")
    assert np.asarray(cache.logits).shape == (len(rows), 3)
    batches = TaskBatches(rows, 8, tok.pad_id, seed=0)
    with torch.no_grad():
        for position in range(3):
            batch = batches.batch_at(1, position)
            assert torch.allclose(cache.get(batch["index"]), teacher(batch), atol=1e-5)
    for (loss_online, stats_online), (loss_cached, stats_cached) in _online_and_cached(student, teacher, cache, batches):
        assert stats_cached["loss_kd"] > 0
        assert float(loss_cached) == pytest.approx(float(loss_online), rel=1e-5, abs=1e-6)
        assert stats_online["flops"] > 0 and stats_cached["flops"] == 0
    # Other label words give other class logits: the cache is keyed on them and refused.
    other = tasks.label_token_ids(tok, ["value", "file", "name"])
    assert teacher_key(tm, other) != key
    with pytest.raises(UserError, match="another teacher"):
        _teacher_cache(tmp_path / "cache", teacher, teacher_key(tm, other), rows, tok.pad_id, 16, "cpu")


def test_lm_head_needs_an_lm_head_and_mixup_needs_no_mask_slot(tmp_path, base_checkpoint, task_files, lm_teachers):
    train = task_files / "train.jsonl"
    out = tmp_path / "out"
    for args, message in [
        (["--teacher", base_checkpoint, "--head", "lm"], "answers at a [MASK] position"),
        (["--teacher", lm_teachers["llama-tiny"], "--head", "words"], "unknown --head"),
        (["--teacher", lm_teachers["llama-tiny"], "--verbalizer", lm_teachers["verbalizer"]], "--verbalizer names"),
        (["--teacher", lm_teachers["llama-tiny"], "--head", "lm", "--verbalizer", tmp_path / "none.json"], "does not exist"),
    ]:
        result = _cli("distill", out, *args, "--train", train, "--max-steps", 1)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (args, result.output)
        assert not out.exists(), args


# -- LM distillation with pretrain's top-K teacher cache -------------------------------------------
@pytest.fixture(scope="module")
def lm_corpus(tmp_path_factory, sp_tokenizer, stdlib_text, lm_teachers):
    from cpmctl.data import prepare

    root = tmp_path_factory.mktemp("lm_corpus")
    prepare(stdlib_text, sp_tokenizer, root / "shards", progress=False)
    return root / "shards"


CORPUS_FAST = ["--student-layers", 1, "--seq-len", 32, "--batch-size", 4, "--max-steps", 3, "--teacher-cache-k", 8]


def test_corpus_cache_gives_the_online_top_k_kd_and_stale_caches_are_refused(tmp_path, lm_teachers, lm_corpus, sp_tokenizer, one_torch_thread):
    from cpmctl.checkpoint import save_model
    from cpmctl.task_model import load_task_model
    from cpmctl.training import read_metrics

    teacher_dir, cache = lm_teachers["llama-tiny"], tmp_path / "cache"
    # With mixup the cache serves the originals and the teacher still runs online on mixed rows.
    result = _cli("distill", tmp_path / "run", "--teacher", teacher_dir, "--data", lm_corpus, "--teacher-cache", cache,
                  "--smix-weight", 0.5, *CORPUS_FAST)
    assert result.exit_code == 0, result.output
    assert (cache / "meta.json").is_file() and np.load(cache / "ids.npy").shape[1] == 8
    last = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "train"][-1]
    assert all(math.isfinite(last[f"loss_{k}"]) and last[f"loss_{k}"] > 0 for k in ("ce", "kd", "mix", "smix"))
    assert last["flops"] > 0  # the mixed rows' teacher passes

    # The cached top-K KD equals top-K KD from the online teacher on the same batches.
    _check_cached_top_k_kd(load_task_model(teacher_dir).model.float().eval(), cache, lm_corpus, sp_tokenizer)

    # A run with --mix-weight 0 reuses the cache as is and never needs the teacher online. It spells
    # the options as distill did before they took pretrain's names (--data, --teacher-cache): still accepted.
    before = (cache / "ids.npy").stat().st_mtime_ns
    reuse = _cli("distill", tmp_path / "reuse", "--teacher", teacher_dir, "--corpus", lm_corpus, "--teacher-logits-cache", cache,
                 "--mix-weight", 0, *CORPUS_FAST)
    assert reuse.exit_code == 0, reuse.output
    assert (cache / "ids.npy").stat().st_mtime_ns == before
    no_cache = _cli("distill", tmp_path / "online", "--teacher", teacher_dir, "--data", lm_corpus, "--mix-weight", 0, *CORPUS_FAST)
    assert no_cache.exit_code == 0, no_cache.output

    def flops(run):  # the student's passes, plus the teacher's when it runs online
        return [r for r in read_metrics(tmp_path / run) if r["kind"] == "train"][-1]["flops"]

    assert 0 < flops("reuse") < flops("online")

    # Stale caches are refused: another K, another teacher, a longer run.
    torch.manual_seed(5)
    other = build_model(ModelConfig.from_preset("llama-tiny", vocab_size=sp_tokenizer.vocab_size, n_layers=2))
    save_model(other, tmp_path / "other_teacher", tokenizer_dir=teacher_dir / "tokenizer")
    for args, message in [
        (["--teacher", teacher_dir, "--teacher-cache-k", 4], "k differ"),
        (["--teacher", tmp_path / "other_teacher"], "teacher_content_hash differ"),
        (["--teacher", teacher_dir, "--max-steps", 5], "covers 3 batches"),
    ]:
        out = tmp_path / "stale"
        result = _cli("distill", out, "--data", lm_corpus, "--teacher-cache", cache, *CORPUS_FAST, *args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (args, result.output)
        assert not out.exists(), args


def _check_cached_top_k_kd(teacher, cache, corpus, tokenizer, k=8, steps=3):
    """LMObjective on CachedTeacherBatches (no teacher at hand) == top-K KD of the online teacher."""
    from cpmctl import losses
    from cpmctl.data import make_batches
    from cpmctl.distill import KeyedBatches, LMObjective, MixKDLanguageModel
    from cpmctl.teacher_cache import CachedTeacherBatches

    config = teacher.config
    span = config.arch == "encoder-decoder"
    student = MixKDLanguageModel(distill.student_from_teacher(teacher, [1], [1] if span else None)).eval()

    def stream():
        return KeyedBatches(make_batches(corpus, tokenizer, objective="span" if span else "causal", batch_size=4, seq_len=32,
                                         seed=0, decoder_start_id=config.start_token_id if span else None))

    weights = distill.LossWeights(ce=0.5, kd=1.0, mix=0.0, smix=0.0)
    cached_objective = LMObjective(weights, 2.0, 0.4, 0, teacher=None)  # no teacher: the cache must serve every batch
    online, cached = stream(), CachedTeacherBatches(stream(), cache)
    with torch.no_grad():
        for _ in range(steps):
            a, b = next(online), next(cached)
            assert a["key"] == b["key"] and torch.equal(a["labels"], b["labels"])
            s_logits = student(a)[0]
            t_logits = losses.lm_forward(teacher, a)
            ids, values = losses.teacher_topk(t_logits, k, student.model.config.vocab_size)
            mask = losses.target_mask(a["labels"])
            want = losses.kd_loss_topk(s_logits, ids, values, mask, 2.0)
            loss, stats = cached_objective(student, b)
            assert stats["loss_kd"] == pytest.approx(float(want), rel=1e-6)
            assert float(loss) == pytest.approx(0.5 * float(losses.lm_loss(s_logits, a["labels"])) + float(want), rel=1e-6)
            assert stats["flops"] == 0
            assert not torch.allclose(want, losses.kd_loss(s_logits, t_logits, mask, 2.0))  # top-k, not the full softmax


def test_corpus_cache_serves_an_encoder_decoder(tmp_path, lm_teachers, lm_corpus, sp_tokenizer, one_torch_thread):
    from cpmctl.task_model import load_task_model

    result = _cli("distill", tmp_path / "run", "--teacher", lm_teachers["t5-tiny"], "--data", lm_corpus,
                  "--teacher-cache", tmp_path / "cache", "--mix-weight", 0, *CORPUS_FAST)
    assert result.exit_code == 0, result.output
    assert '"cache_flops"' in result.output
    _check_cached_top_k_kd(load_task_model(lm_teachers["t5-tiny"]).model.float().eval(), tmp_path / "cache", lm_corpus, sp_tokenizer)
