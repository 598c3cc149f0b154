"""Prompt tuning: placement, the prompt reaching the model exactly, reparameterisation folding,
deep prompts, gradient checkpointing, PEFT loading our adapter with the same outputs, the
stage end to end (only the prompt trains), `infer --prompt`, and clear errors."""

from __future__ import annotations

import copy
import json
import logging
import random
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cpmctl.checkpoint import load_model, open_checkpoint, save_model
from cpmctl.cli import app
from cpmctl.config import ModelConfig
from cpmctl.errors import UserError
from cpmctl.model import build_model
from cpmctl.prompt import (Adapter, PromptedClassifier, SoftPrompt, gradient_checkpointing, load_adapter, peft_config,
                           place_prompt, prompt_plan, save_adapter)
from cpmctl.stages import prompt_tune as stage
from cpmctl.tasks import (EncodedExample, Example, LabelSet, LinearHead, Scorer, classification_loss, collate,
                          encode_examples, label_token_ids)

TOL = 1e-5


def _row(n: int, pair_at: int | None = None) -> EncodedExample:
    return EncodedExample(list(range(10, 10 + n)), [0] * n, [1] * n, -1, {"start": 0, "between": pair_at, "end": n}, [-1] * n, 0)


# -- placement -----------------------------------------------------------------------------------
def test_prompt_plan_and_placement():
    assert prompt_plan("front", 5) == [("start", 5)]
    assert prompt_plan("front+middle+back", 100) == [("start", 34), ("between", 33), ("end", 33)]
    plan = prompt_plan("front+middle+back", 7)  # 3 + 2 + 2
    pair = place_prompt(_row(4, pair_at=2), plan)
    assert pair.virtual == [0, 1, 2, -1, -1, 3, 4, -1, -1, 5, 6]
    single = place_prompt(_row(3), plan)  # no pair: the middle part sits just before the back part
    assert single.virtual == [0, 1, 2, -1, -1, -1, 3, 4, 5, 6]
    with pytest.raises(UserError, match="needs pair examples"):
        place_prompt(_row(3), prompt_plan("middle", 2))
    with pytest.raises(UserError, match="unknown prompt position"):
        prompt_plan("side", 2)


# -- the prompt reaches the model exactly --------------------------------------------------------
def _tiny(preset: str, vocab: int = 200, seed: int = 0, **kw):
    torch.manual_seed(seed)
    return build_model(ModelConfig.from_preset(preset, vocab_size=vocab, init_std=0.2, **kw)).eval()


def _batch(rows):
    return collate(rows, pad_id=0)


def test_front_prompt_equals_concatenated_embeddings():
    model = _tiny("bert-tiny")
    head = LinearHead(64, 3)
    vectors = torch.randn(4, 64)
    classifier = PromptedClassifier(Scorer(model, head=head), SoftPrompt(vectors)).eval()
    rows = [place_prompt(_row(6), [("start", 4)]), place_prompt(_row(3), [("start", 4)])]
    batch = _batch(rows)
    with torch.no_grad():
        got = classifier.scorer.hidden_states(batch, classifier.inputs_embeds(batch))
        for i, n in enumerate((6, 3)):
            ids = torch.arange(10, 10 + n)[None]
            embeds = torch.cat([vectors[None], model.embed.tokens(ids)], dim=1)
            want = model.encode(None, inputs_embeds=embeds)
            assert (got[i, : 4 + n] - want[0]).abs().max() <= TOL


def test_mlp_reparam_folds_into_plain_vectors():
    model = _tiny("t5-tiny")
    label_ids = [[5], [6, 7]]
    prompt = SoftPrompt(torch.randn(5, 64), reparam="mlp", hidden=16)
    with torch.no_grad():
        for p in prompt.mlp.parameters():
            p.normal_(std=0.3)  # a trained-looking MLP (its last layer starts at zero)
    rows = [place_prompt(_row(6, pair_at=3), prompt_plan("front+middle+back", 5))]
    batch = _batch(rows)
    with torch.no_grad():
        want = PromptedClassifier(Scorer(model, label_ids=label_ids), prompt)(batch)
        folded = SoftPrompt(prompt.folded())
        got = PromptedClassifier(Scorer(model, label_ids=label_ids), folded)(batch)
    assert not torch.equal(prompt.folded(), prompt.embedding.detach())
    assert (got - want).abs().max() <= TOL


def test_deep_prompt_starts_shallow_and_its_hooks_come_off():
    model = _tiny("bert-tiny")
    head = LinearHead(64, 3)
    vectors = torch.randn(3, 64)
    rows = [place_prompt(_row(5), [("start", 3)]), place_prompt(_row(2), [("start", 3)])]
    batch = _batch(rows)
    shallow = PromptedClassifier(Scorer(model, head=head), SoftPrompt(vectors))
    deep_prompt = SoftPrompt(vectors, deep_layers=model.config.n_layers - 1)
    # The deep hooks live on the model instance, so the deep classifier gets its own copy.
    deep = PromptedClassifier(Scorer(copy.deepcopy(model), head=head), deep_prompt)
    with torch.no_grad():
        assert torch.equal(shallow(batch), deep(batch))  # deltas start at zero
        deep_prompt.deep.normal_()
        changed = deep(batch)
    assert (changed - shallow(batch)).abs().max() > 1e-3
    shallow.remove_hooks()
    deep.remove_hooks()
    with torch.no_grad():  # hooks removed: only the input-layer prompt is left, as in the shallow one
        assert torch.equal(deep(batch), shallow(batch))


def test_gradient_checkpointing_gives_the_same_gradients():
    model = _tiny("llama-tiny", dropout=0.0)
    for p in model.parameters():
        p.requires_grad_(False)
    prompt = SoftPrompt(torch.randn(3, 64))
    classifier = PromptedClassifier(Scorer(model, label_ids=[[5], [9]]), prompt).train()
    batch = _batch([place_prompt(_row(5), [("end", 3)]), place_prompt(_row(4), [("end", 3)])])
    batch["labels"] = torch.tensor([0, 1])
    grads = []
    for enabled in (False, True):
        prompt.embedding.grad = None
        with gradient_checkpointing(model, enabled):
            classification_loss(classifier(batch), batch["labels"]).backward()
        grads.append(prompt.embedding.grad.clone())
    assert (grads[0] - grads[1]).abs().max() <= 1e-6 and grads[0].abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())  # frozen weights got no gradient buffers
    assert type(model.decoder.blocks[0]).__name__ == "Block"  # unwrapped afterwards


def _kept_for_backward_bytes(classifier, batch) -> int:
    """Bytes autograd keeps from one forward pass for the backward pass, parameters not counted
    (each storage once). Inside checkpointed blocks torch's own hooks keep nothing."""
    params = {p.untyped_storage().data_ptr() for p in classifier.parameters()}
    kept: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        classification_loss(classifier(batch), batch["labels"])
    return sum(kept.values())


def test_frozen_backbone_keeps_no_weight_gradient_inputs_and_checkpointing_keeps_less():
    model = _tiny("bert-tiny")
    classifier = PromptedClassifier(Scorer(model, head=LinearHead(64, 2)), SoftPrompt(torch.randn(4, 64))).train()
    batch = _batch([place_prompt(_row(12), [("start", 4)]), place_prompt(_row(9), [("start", 4)])])
    batch["labels"] = torch.tensor([0, 1])
    trainable = _kept_for_backward_bytes(classifier, batch)
    for p in model.parameters():
        p.requires_grad_(False)
    frozen = _kept_for_backward_bytes(classifier, batch)
    with gradient_checkpointing(model):
        checkpointed = _kept_for_backward_bytes(classifier, batch)
    # Frozen linear layers need no inputs kept (those only serve weight gradients); checkpointed
    # blocks keep none of their activations (only their inputs, which autograd holds elsewhere).
    assert checkpointed < frozen < trainable
    tokens, d, d_ff = batch["input_ids"].numel(), model.config.d_model, model.config.d_ff
    assert trainable - frozen >= model.config.n_layers * tokens * (d + d_ff) * 4  # the FFN's inputs at least


# -- PEFT loads our adapter and computes the same thing ------------------------------------------
def _save_prompt_adapter(out: Path, vectors: torch.Tensor, config, base: str) -> None:
    adapter = Adapter(prompt=vectors, meta={"plan": [["start", vectors.shape[0]]], "labels": ["a", "b"],
                                            "verbalizer": {"a": "a", "b": "b"}, "scoring": "lm", "head": None,
                                            "base_model_hash": "sha256:x", "d_model": config.d_model})
    adapter.peft = peft_config(adapter, config, base, "random")
    save_adapter(out, adapter)


def test_peft_loads_our_front_prompt_with_equal_outputs(tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from test_hf import bert_config, randomize, tiny_llama

    from cpmctl import hf

    transformers.logging.set_verbosity_error()
    ids = torch.randint(3, 120, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    for name, ref in (("bert", randomize(transformers.BertModel(bert_config()), 21)), ("llama", tiny_llama(22, False, 2))):
        ref.save_pretrained(tmp_path / f"{name}-hf")
        ours, ck = load_model(hf.import_hf(tmp_path / f"{name}-hf", tmp_path / f"{name}-ck"))
        vectors = torch.randn(5, ours.config.d_model, generator=torch.Generator().manual_seed(3)) * 0.5
        _save_prompt_adapter(tmp_path / f"{name}-prompt", vectors, ours.config, str(tmp_path / f"{name}-hf"))
        peft_model = peft.PeftModel.from_pretrained(ref, tmp_path / f"{name}-prompt").eval()
        assert torch.equal(peft_model.get_prompt_embedding_to_save("default"), vectors)

        rows = [EncodedExample(ids[i][: int(mask[i].sum())].tolist(), [0] * int(mask[i].sum()), [1] * int(mask[i].sum()), -1,
                               {"start": 0, "between": None, "end": int(mask[i].sum())}, [-1] * int(mask[i].sum()), 0) for i in range(2)]
        batch = _batch([place_prompt(r, [("start", 5)]) for r in rows])
        classifier = PromptedClassifier(Scorer(ours, head=LinearHead(ours.config.d_model, 2)), SoftPrompt(load_adapter(tmp_path / f"{name}-prompt").prompt))
        with torch.no_grad():
            embeds = classifier.inputs_embeds(batch)
            if name == "bert":
                want = peft_model(input_ids=ids, attention_mask=mask).last_hidden_state
                got = ours.encode(None, batch["attention_mask"], batch["token_type_ids"], inputs_embeds=embeds)
            else:
                want = peft_model(input_ids=ids, attention_mask=mask).logits
                got = ours(attention_mask=batch["attention_mask"], inputs_embeds=embeds)
        keep = torch.cat([torch.ones(2, 5, dtype=torch.long), mask], dim=1).bool()
        assert want.shape == got.shape
        assert (want - got).abs()[keep].max() <= TOL, name
        ck.close()


# -- the stage end to end ------------------------------------------------------------------------
def _keyword_task(path: Path, n: int, seed: int) -> Path:
    """Label = which keyword the sentence holds; filler words are shared by both classes."""
    rng = random.Random(seed)
    filler = "the of a to in is for that with as on by this be are from or".split()
    records = []
    for _ in range(n):
        label = rng.choice(["file", "value"])
        words = [rng.choice(filler) for _ in range(rng.randint(1, 3))]
        words.insert(rng.randint(0, len(words)), label)
        records.append({"text": " ".join(words), "label": "yes" if label == "file" else "no"})
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory, sp_tokenizer):
    root = tmp_path_factory.mktemp("pt")
    tok_dir = sp_tokenizer.save(root / "tok")
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_preset("bert-tiny", vocab_size=sp_tokenizer.vocab_size, max_positions=24, init_std=0.1))
    save_model(model, root / "model", tokenizer_dir=tok_dir, stage="test")
    return root


def test_prompt_tune_trains_only_the_prompt_and_infers(tiny_encoder, tmp_path, caplog):
    root = tiny_encoder
    train = _keyword_task(tmp_path / "train.jsonl", 300, 1)
    dev = _keyword_task(tmp_path / "dev.jsonl", 80, 2)
    before = {k: v.clone() for k, v in open_checkpoint(root / "model").state_dict().items()}
    cfg = stage.PromptTuneConfig(model=root / "model", train=train, dev=dev, test=dev, out=tmp_path / "prompt", prompt_length=4,
                                 position="front+middle+back", head="linear", optimizer="adamw", lr=0.05, batch_size=16,
                                 max_steps=60, eval_every=20,
                                 device="cpu", progress=False)
    result = stage.run(cfg)
    assert result["best"]["metrics"]["accuracy"] >= 0.9
    assert result["trainable_parameters"] == 4 * 64 + 64 * 2 + 2
    adapter = load_adapter(tmp_path / "prompt")
    assert adapter.prompt.shape == (4, 64) and set(adapter.head) == {"proj.weight", "proj.bias"}
    cfg_json = json.loads((tmp_path / "prompt" / "adapter_config.json").read_text())
    assert cfg_json["peft_type"] == "PROMPT_TUNING" and cfg_json["num_virtual_tokens"] == 4
    assert "cpmctl" not in cfg_json  # cpmctl's fields live beside it, where PEFT does not look
    meta = json.loads((tmp_path / "prompt" / "cpmctl_adapter.json").read_text())
    assert meta["plan"] == [["start", 2], ["between", 1], ["end", 1]]
    assert (tmp_path / "prompt" / "metrics.jsonl").is_file() and not (tmp_path / "prompt.train").exists()
    after = open_checkpoint(root / "model").state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the backbone is untouched

    # infer --prompt reproduces the stage's test accuracy
    runner = CliRunner()
    out = runner.invoke(app, ["infer", str(root / "model"), "--prompt", str(tmp_path / "prompt"), "--input", str(dev), "--json"])
    assert out.exit_code == 0, out.output
    stats = json.loads(out.stdout)["result"]["stats"]
    assert stats["accuracy"] == result["test"]["accuracy"] and stats["macro_f1"] == result["test"]["macro_f1"]

    # another base model is refused in one line
    other = build_model(ModelConfig.from_preset("bert-tiny", vocab_size=1100, max_positions=24))
    save_model(other, tmp_path / "other", tokenizer_dir=root / "model" / "tokenizer", stage="test")
    out = runner.invoke(app, ["infer", str(tmp_path / "other"), "--prompt", str(tmp_path / "prompt"), "--input", str(dev)])
    assert out.exit_code == 2 and "was trained on base model" in out.output

    # inputs that do not fit next to the prompt are truncated with a warning
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"text": " ".join(["value"] * 40), "label": "no"}) + "\n")
    with caplog.at_level(logging.WARNING, logger="cpmctl"):
        out = runner.invoke(app, ["infer", str(root / "model"), "--prompt", str(tmp_path / "prompt"), "--input", str(long), "--json"])
    assert out.exit_code == 0 and "truncated to fit 24 positions (4 of them for the prompt)" in caplog.text


def test_full_fine_tuning_baseline_and_errors(tiny_encoder, tmp_path):
    root = tiny_encoder
    train = _keyword_task(tmp_path / "train.jsonl", 64, 3)
    cfg = stage.PromptTuneConfig(model=root / "model", train=train, dev=train, out=tmp_path / "full", head="linear", full=True,
                                 batch_size=16, max_steps=4, eval_every=2, device="cpu", progress=False)
    result = stage.run(cfg)
    assert result["trainable_parameters"] == result["backbone_parameters"] + 64 * 2 + 2
    tuned = open_checkpoint(tmp_path / "full" / "model").state_dict()
    base = open_checkpoint(root / "model").state_dict()
    assert any(not torch.equal(tuned[k], base[k]) for k in base)
    runner = CliRunner()
    out = runner.invoke(app, ["infer", str(tmp_path / "full" / "model"), "--prompt", str(tmp_path / "full"), "--input", str(train), "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["result"]["stats"]["examples"] == 64

    base_args = ["prompt-tune", str(root / "model"), str(tmp_path / "x"), "--train", str(train), "--prompt-length", "4"]
    out = runner.invoke(app, [*base_args, "--head", "linear", "--position", "middle"])
    assert out.exit_code == 2 and "needs pair examples" in out.output
    out = runner.invoke(app, base_args)  # MLM scoring: "yes"/"no" are not single pieces here
    assert out.exit_code == 2 and "single-token label words" in out.output
    assert not (tmp_path / "x").exists()


def test_deep_mlm_adapter_round_trips_through_infer_loading(tiny_encoder, tmp_path, sp_tokenizer):
    """A deep prompt scored by the MLM head at the mask: saved, loaded by `load_classifier` on the
    base checkpoint, same class logits as the in-memory classifier."""
    from cpmctl.prompt import base_model_hash, load_classifier

    root = tiny_encoder
    model, ck = load_model(root / "model")
    labels = LabelSet(("no", "yes"), ("file", "value"))
    label_ids = label_token_ids(sp_tokenizer, labels.words)
    plan = prompt_plan("front+middle+back", 5)
    examples = [Example("open the value", "yes", "and more"), Example("a file", "no")]
    rows, _ = encode_examples(sp_tokenizer, model.config, examples, labels, mode="lm", max_length=24, reserve=5)
    batch = _batch([place_prompt(r, plan) for r in rows])
    assert int(batch["input_ids"][0, batch["answer"][0]]) == sp_tokenizer.mask_id
    prompt = SoftPrompt(torch.randn(5, 64), deep_layers=1)
    with torch.no_grad():
        prompt.deep.normal_()
        want = PromptedClassifier(Scorer(copy.deepcopy(model), label_ids=label_ids), prompt)(batch)
    meta = {"plan": [list(p) for p in plan], "labels": list(labels.labels), "verbalizer": labels.to_dict(), "scoring": "lm",
            "head": None, "base_model_hash": base_model_hash(ck, model), "d_model": 64, "max_length": 24}
    adapter = Adapter(prompt=prompt.folded(), meta=meta, deep=prompt.deep.detach())
    adapter.peft = peft_config(adapter, model.config, str(root / "model"), "vocab")
    save_adapter(tmp_path / "deep", adapter)
    classifier, loaded_labels, loaded = load_classifier(model, ck, tmp_path / "deep")
    with torch.no_grad():
        got = classifier(batch)
    assert loaded_labels == labels and loaded.plan == plan
    assert (got - want).abs().max() <= TOL
    classifier.remove_hooks()
    ck.close()


def test_full_run_head_applies_to_its_moefied_copy_and_a_mismatch_names_the_model(tiny_encoder, tmp_path, caplog):
    """moefy of a `prompt-tune --full` run carries its linear head; `infer MOE --prompt RUN` is
    accepted with a note (the MoEfied copy keeps the base function); on another model the error
    names RUN/model, the model the prompt was trained on."""
    from cpmctl.stages.moefy import MoefyConfig, run as moefy

    root = tiny_encoder
    train = _keyword_task(tmp_path / "train.jsonl", 64, 3)
    stage.run(stage.PromptTuneConfig(model=root / "model", train=train, out=tmp_path / "full", head="linear", full=True,
                                     batch_size=16, max_steps=4, device="cpu", progress=False))
    report = moefy(MoefyConfig(checkpoint=tmp_path / "full", out=tmp_path / "moe", experts=4, top_k=4, router="center", task=train))
    assert report["task"]["scoring"] == "linear" and report["task"]["moe_accuracy"] == report["task"]["dense_accuracy"]
    assert (tmp_path / "moe" / "task.json").is_file() and (tmp_path / "moe" / "head.safetensors").is_file()
    runner = CliRunner()
    dense = runner.invoke(app, ["infer", str(tmp_path / "full" / "model"), "--prompt", str(tmp_path / "full"), "--input", str(train), "--json"])
    moe = runner.invoke(app, ["infer", str(tmp_path / "moe"), "--prompt", str(tmp_path / "full"), "--input", str(train), "--json"])
    assert moe.exit_code == 0, moe.output
    assert json.loads(moe.stdout)["result"]["stats"]["accuracy"] == json.loads(dense.stdout)["result"]["stats"]["accuracy"]
    assert "MoEfied copy of that model" in caplog.text
    wrong = runner.invoke(app, ["infer", str(root / "model"), "--prompt", str(tmp_path / "full"), "--input", str(train)])
    assert wrong.exit_code == 2 and f"use {tmp_path / 'full' / 'model'}, which is that model" in wrong.output, wrong.output
