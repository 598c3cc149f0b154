"""`cpmctl convert cpm2`: both released formats written from their public definitions (see
cpm2_writers.py), converted, and checked against transformers' T5 built from the same tensors by
deepdialog/CPM-2.0-GEN's mapping; the CPM-2 tokenizer against ids derived by hand; bad inputs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from typer.testing import CliRunner  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import cpm2_writers as W  # noqa: E402

from cpmctl.checkpoint import load_model, read_provenance, verify_checkpoint  # noqa: E402
from cpmctl.cli import app  # noqa: E402
from cpmctl.config import ModelConfig  # noqa: E402
from cpmctl.cpm2.convert import convert_cpm2, plan_conversion  # noqa: E402
from cpmctl.cpm2.tokenizer import CPM2Tokenizer  # noqa: E402
from cpmctl.errors import UserError  # noqa: E402
from cpmctl.model import build_model  # noqa: E402
from cpmctl.tokenizer import load_tokenizer  # noqa: E402

transformers.logging.set_verbosity_error()
TOL = 1e-5
runner = CliRunner()
VOCAB = 256
DIMS = dict(vocab=VOCAB, d=64, heads=4, d_head=16, d_ff=96, n_enc=2, n_dec=3)
WORDS = ["我", "爱", "北京", "天", "安", "门", "京天", "，", "好", "AB", "C", "1", "23", "\u2582", "\u2583", "hello",
         "wor", "ld", "你好", "。", "a", "他", "来到", "了"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_user_error(result, fragment: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and fragment in lines[0], lines[0]


# ---------------------------------------------------------------------------------------------
# the reference: transformers' T5 loaded by deepdialog/CPM-2.0-GEN's mapping
# ---------------------------------------------------------------------------------------------
def reference_t5(eff: dict[str, torch.Tensor], vocab_lines: list[str]):
    """T5ForConditionalGeneration with CPM-2's config, its tensors placed as deepdialog places
    BMInf's (q/k/v = w_project_qkv[0..2], cross k/v = encoder_kv[n][0..1], wi_0/wi_1/wo, the
    position bias into block 0), here from the training-release names of the same values."""
    ids = {t: i for i, t in enumerate(vocab_lines)}
    d, h = DIMS["d"], DIMS["heads"] * DIMS["d_head"]
    cfg = transformers.T5Config(
        vocab_size=VOCAB, d_model=d, d_kv=DIMS["d_head"], d_ff=DIMS["d_ff"], num_layers=DIMS["n_enc"],
        num_decoder_layers=DIMS["n_dec"], num_heads=DIMS["heads"], relative_attention_num_buckets=32,
        relative_attention_max_distance=128, dropout_rate=0.0, feed_forward_proj="gated-gelu",
        tie_word_embeddings=False, eos_token_id=ids["<eod>"], pad_token_id=ids["<pad>"],
        decoder_start_token_id=ids["<pad>"],
    )
    sd = {"shared.weight": eff["word_embeds.weight"], "lm_head.weight": eff["lm_head.weight"]}
    sd["encoder.embed_tokens.weight"] = sd["decoder.embed_tokens.weight"] = sd["shared.weight"]
    for stack, count in (("encoder", DIMS["n_enc"]), ("decoder", DIMS["n_dec"])):
        sd[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = \
            eff[f"{stack}.blocks.0.self_attn.self_attn.relative_attention_bias.weight"]
        for n in range(count):
            src, dst = f"{stack}.blocks.{n}", f"{stack}.block.{n}.layer"
            q, k, v = eff[f"{src}.self_attn.self_attn.project.weight"].reshape(3, h, d)
            sd.update({f"{dst}.0.SelfAttention.q.weight": q, f"{dst}.0.SelfAttention.k.weight": k,
                       f"{dst}.0.SelfAttention.v.weight": v,
                       f"{dst}.0.SelfAttention.o.weight": eff[f"{src}.self_attn.self_attn.dense.weight"],
                       f"{dst}.0.layer_norm.weight": eff[f"{src}.self_attn.layer_norm.weight"]})
            f = 1
            if stack == "decoder":
                ck, cv = eff[f"{src}.cross_attn.cross_attn.project_kv.weight"].reshape(2, h, d)
                sd.update({f"{dst}.1.EncDecAttention.q.weight": eff[f"{src}.cross_attn.cross_attn.project_q.weight"],
                           f"{dst}.1.EncDecAttention.k.weight": ck, f"{dst}.1.EncDecAttention.v.weight": cv,
                           f"{dst}.1.EncDecAttention.o.weight": eff[f"{src}.cross_attn.cross_attn.dense.weight"],
                           f"{dst}.1.layer_norm.weight": eff[f"{src}.cross_attn.layer_norm.weight"]})
                f = 2
            for key in ("wi_0", "wi_1", "wo"):
                sd[f"{dst}.{f}.DenseReluDense.{key}.weight"] = eff[f"{src}.ff.dense_relu_dense.{key}.weight"]
            sd[f"{dst}.{f}.layer_norm.weight"] = eff[f"{src}.ff.layer_norm.weight"]
        sd[f"{stack}.final_layer_norm.weight"] = eff[f"{stack}.final_layernorm.weight"]
    model = transformers.T5ForConditionalGeneration(cfg)
    # transformers 5 ties the head to the embedding whatever the config says; CPM-2's is its own.
    model.lm_head.weight = torch.nn.Parameter(torch.empty(VOCAB, d))
    model.load_state_dict(sd, strict=True)
    assert torch.equal(model.lm_head.weight, eff["lm_head.weight"]) and torch.equal(model.shared.weight, eff["word_embeds.weight"])
    return model.eval()


def batch(seed: int, length: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, length - 3:] = 0
    return ids, mask


def assert_logits_match(ckpt: Path, ref) -> None:
    ours, handle = load_model(ckpt)
    try:
        ids, mask = batch(1, 9)
        dec, dec_mask = batch(2, 6)
        dec_mask[:] = 1
        with torch.inference_mode():
            want = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask).logits
            got = ours(ids, mask, dec, dec_mask)
        assert (want - got).abs().max().item() <= TOL
    finally:
        handle.close()


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """The same random model as a BMInf file (int8 + scales, fp16 embedding, fp32 norms) and as
    two model-parallel shards, with its vocab.txt and the reference values of each."""
    root = tmp_path_factory.mktemp("cpm2")
    sd = W.random_cpm2(**DIMS, seed=3)
    lines = W.write_vocab(root / "vocab.txt", WORDS, VOCAB)
    tree, eff = W.bminf_tree(sd, DIMS["heads"])
    bminf_dir = root / "cpm2.1"
    bminf_dir.mkdir()
    W.write_bminf(bminf_dir / "checkpoint.pt", tree)
    (bminf_dir / "vocab.txt").write_bytes((root / "vocab.txt").read_bytes())
    shard_dir = root / "mp"
    W.write_shards(shard_dir, sd, ranks=2, dtype=torch.float32)
    return {"root": root, "sd": sd, "eff": eff, "lines": lines, "bminf": bminf_dir, "shards": shard_dir, "tree": tree}


# ---------------------------------------------------------------------------------------------
# parity
# ---------------------------------------------------------------------------------------------
def test_bminf_release_matches_transformers(release, tmp_path):
    out = tmp_path / "m"
    result = invoke("convert", "cpm2", release["bminf"], out, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)["result"]
    assert summary["source_format"] == "bminf" and summary["model"]["decoder_layers"] == 3
    assert_logits_match(out, reference_t5(release["eff"], release["lines"]))
    prov = verify_checkpoint(out)
    assert prov["stage"] == "convert-cpm2" and prov["options"]["source_format"] == "bminf-checkpoint"
    (path, digest), = prov["options"]["source_files"].items()
    import hashlib
    assert digest == "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()
    cfg = ModelConfig.from_dict(json.loads((out / "config.json").read_text()))
    assert (cfg.pad_token_id, cfg.eos_token_id) == (release["lines"].index("<pad>"), release["lines"].index("<eod>"))
    assert cfg.gated and cfg.activation == "gelu_tanh" and not cfg.tie_embeddings and not cfg.attn_scale
    assert not list(tmp_path.glob(".*scratch*")), "scratch files left behind"


def test_model_parallel_release_matches_transformers(release, tmp_path):
    out = tmp_path / "m"
    summary = convert_cpm2(release["shards"], out, vocab=release["root"] / "vocab.txt")
    assert summary["source_format"] == "megatron" and len(summary["source_files"]) == 2
    # The shards are float32: the merged model is the training model exactly.
    assert_logits_match(out, reference_t5(release["sd"], release["lines"]))
    assert len(read_provenance(out)["options"]["source_files"]) == 2


def test_small_spill_groups_and_fp16_output(release, tmp_path):
    """Spilling every tensor alone gives the same weights; --dtype float16 is the fp32 result rounded."""
    convert_cpm2(release["bminf"], tmp_path / "a", spill_bytes=1)
    convert_cpm2(release["bminf"], tmp_path / "b", dtype="float16")
    a, ha = load_model(tmp_path / "a")
    b, hb = load_model(tmp_path / "b")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert y.dtype == torch.float16 and torch.equal(x.to(torch.float16), y), name
    ha.close(), hb.close()


def test_greedy_generation_through_infer_matches_transformers(release, tmp_path):
    out = tmp_path / "m"
    convert_cpm2(release["bminf"], out)
    ref = reference_t5(release["eff"], release["lines"])
    tok = load_tokenizer(out / "tokenizer")
    prompt = "我爱北京天安门"
    ids = tok.encode(prompt, add_eos=True)
    with torch.inference_mode():
        # Without its cache: transformers 5.25's sizes it by the encoder's depth (2), not the decoder's (3).
        hf = ref.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, num_beams=1,
                          use_cache=False)[0].tolist()[1:]
    hf = hf[: hf.index(tok.eos_id)] if tok.eos_id in hf else hf
    assert hf, "the reference generated nothing; pick another seed"
    result = invoke("infer", out, prompt, "--max-new-tokens", "8", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["result"]["outputs"][0]["generated"] == tok.decode(hf)


def test_dry_run_on_a_real_size_header(tmp_path):
    """The 11B model's layout with the data left out (a sparse file): shapes read, nothing converted."""
    c = ModelConfig.from_preset("cpm2-11b")
    path = tmp_path / "checkpoint.pt"
    W.write_bminf(path, W.shape_tree(c.vocab_size, c.d_model, c.n_heads, c.d_head, c.d_ff, c.n_layers, c.n_decoder_layers),
                  sparse=True)
    result = invoke("convert", "cpm2", path, tmp_path / "out", "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    s = json.loads(result.stdout)["result"]
    assert s["model"] == {"vocab_size": 26240, "d_model": 4096, "n_heads": 64, "d_head": 64, "d_ff": 10240,
                          "encoder_layers": 24, "decoder_layers": 24, "relative_buckets": 32}
    expected = sum(t.numel() for t in build_model(c, device="meta").state_dict().values())
    assert s["parameters"] == expected and s["output_bytes"] == 4 * expected
    assert s["peak_memory_bytes"] < s["output_bytes"] / 10  # far below the model's fp32 size
    assert not (tmp_path / "out").exists()
    text = invoke("convert", "cpm2", path, tmp_path / "out", "--dry-run")
    assert "would write" in text.stdout and "peak memory" in text.stdout


# ---------------------------------------------------------------------------------------------
# the tokenizer
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok(release):
    return CPM2Tokenizer((release["root"] / "vocab.txt").read_bytes())


def ids_of(lines, tokens):
    return [max(i for i, t in enumerate(lines) if t == tok) for tok in tokens]


@pytest.mark.parametrize("text, tokens", [
    # jieba: 我/爱/北京/天安门; "天安门" is not an entry, so it splits greedily; "京天" spans two words and is never used.
    ("我爱北京天安门", ["我", "爱", "北京", "天", "安", "门"]),
    # Full-width ASCII to half-width (ＡＢＣ１２３ -> ABC123, one jieba word), the Chinese comma kept.
    ("ＡＢＣ１２３，好", ["AB", "C", "1", "23", "，", "好"]),
    # Space and newline become placeholders; "world" splits into the longest entries.
    ("hello world\n你好", ["hello", "\u2582", "wor", "ld", "\u2583", "你好"]),
    # The ideographic space U+3000 is a space; a character in no entry is <unk>.
    ("好\u3000龘", ["好", "\u2582", "<unk>"]),
    # A word over 200 characters is one <unk>.
    ("a" * 201, ["<unk>"]),
    ("", []),
])
def test_tokenizer_ids_follow_the_public_algorithm(tok, release, text, tokens):
    assert tok.encode(text) == ids_of(release["lines"], tokens)


def test_tokenizer_specials_decode_and_roundtrip(tok, release, tmp_path):
    lines = release["lines"]
    assert (tok.pad_id, tok.eos_id, tok.unk_id) == (lines.index("<pad>"), lines.index("<eod>"), lines.index("<unk>"))
    assert tok.sentinel_ids == [lines.index(f"<s_{i}>") for i in range(190)]
    assert tok.vocab_size == VOCAB
    assert tok.decode(tok.encode("hello world\n你好")) == "hello world\n你好"
    assert tok.decode(tok.encode("你好") + [tok.eos_id]) == "你好"
    again = load_tokenizer(tok.save(tmp_path / "t"))
    assert type(again) is CPM2Tokenizer and again.encode("我爱北京天安门") == tok.encode("我爱北京天安门")


def test_repeated_vocab_entry_keeps_its_last_id(tmp_path):
    lines = W.write_vocab(tmp_path / "v.txt", ["好", "好"], VOCAB)
    tok = CPM2Tokenizer((tmp_path / "v.txt").read_bytes())
    assert tok.encode("好") == [max(i for i, t in enumerate(lines) if t == "好")] == [4]


def test_missing_jieba_is_a_user_error(release, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "jieba", None)
    fresh = CPM2Tokenizer((release["root"] / "vocab.txt").read_bytes())
    with pytest.raises(UserError, match="pip install"):
        fresh.encode("你好")
    result = invoke("convert", "cpm2", release["bminf"], tmp_path / "m")
    assert_user_error(result, "pip install")
    assert not (tmp_path / "m").exists()


# ---------------------------------------------------------------------------------------------
# bad input: exit 2, one line, no OUT
# ---------------------------------------------------------------------------------------------
def _bad_bminf(release, tmp_path, **kwargs) -> Path:
    path = tmp_path / "bad.pt"
    W.write_bminf(path, kwargs.pop("tree", release["tree"]), **kwargs)
    return path


def _assert_refused(tmp_path, src, fragment, *extra):
    out = tmp_path / "out"
    assert_user_error(invoke("convert", "cpm2", src, out, *extra), fragment)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if "scratch" in p.name]


def test_error_truncated_bminf_file(release, tmp_path):
    path = _bad_bminf(release, tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _assert_refused(tmp_path, path, "truncated")


def test_error_unknown_dtype_code(release, tmp_path):
    path = _bad_bminf(release, tmp_path, code_override={"encoder.1.layer_nrom_before_ff.weight": 7})
    _assert_refused(tmp_path, path, "unknown dtype code 7")


def _without(tree, path: list[str], key: str):
    import copy

    tree = copy.deepcopy(tree)
    node = tree
    for name in path:
        node = node["layers"][name]
    del node["params"][key]
    return tree


def test_error_scale_without_tensor_and_tensor_without_scale(release, tmp_path):
    where = ["encoder", "0", "dense_gelu_dense", "wi_1"]
    path = _bad_bminf(release, tmp_path, tree=_without(release["tree"], where, "weight"))
    _assert_refused(tmp_path, path, "scale encoder.0.dense_gelu_dense.wi_1.weight_scale has no tensor")
    path = _bad_bminf(release, tmp_path, tree=_without(release["tree"], where, "weight_scale"))
    _assert_refused(tmp_path, path, "int8 tensor encoder.0.dense_gelu_dense.wi_1.weight has no")


def test_error_missing_rank(release, tmp_path):
    shards = tmp_path / "mp"
    W.write_shards(shards, release["sd"], ranks=4)
    (shards / "mp_rank_02_model_states.pt").unlink()
    _assert_refused(tmp_path, shards, "missing model-parallel rank(s) 2")
    (shards / "mp_rank_03_model_states.pt").unlink()  # ranks 0-1 left, but each says it was one of 4
    _assert_refused(tmp_path, shards, "saved with 4 model-parallel ranks")


def test_error_ranks_disagree_on_shapes(release, tmp_path):
    shards = tmp_path / "mp"
    W.write_shards(shards, release["sd"], ranks=2)
    path = shards / "mp_rank_01_model_states.pt"
    data = torch.load(path, weights_only=True)
    name = "decoder.blocks.1.ff.dense_relu_dense.wi_0.weight"
    data["module"][name] = data["module"][name][:-2]
    torch.save(data, path)
    _assert_refused(tmp_path, shards, f"disagree on the shape of {name}")


def test_error_vocab_size_disagrees_with_embedding(release, tmp_path):
    W.write_vocab(tmp_path / "small.txt", WORDS, VOCAB - 6)
    _assert_refused(tmp_path, release["bminf"], f"has {VOCAB - 6} entries, but the checkpoint's embedding has {VOCAB} rows",
                    "--vocab", tmp_path / "small.txt")


def test_error_pickled_code_in_shards_refused(release, tmp_path):
    shards = tmp_path / "mp"
    shards.mkdir()
    torch.save({"module": {"word_embeds.weight": torch.zeros(2, 2)}, "args": Path("x")}, shards / "mp_rank_00_model_states.pt")
    _assert_refused(tmp_path, shards, "cannot read")


def test_error_moe_release_refused_by_name(tmp_path):
    shards = tmp_path / "moe"
    shards.mkdir()
    torch.save({"model": {"word_embeds.weight": torch.zeros(2, 2)}}, shards / "mp_rank_03_00_model_states.pt")
    _assert_refused(tmp_path, shards, "MoE release")


def test_error_not_a_release(tmp_path):
    (tmp_path / "src").mkdir()
    _assert_refused(tmp_path, tmp_path / "src", "holds neither")
    with pytest.raises(UserError, match="does not exist"):
        plan_conversion(tmp_path / "nothing")


def test_deepspeed_latest_directory_and_bad_dtype(release, tmp_path):
    """A DeepSpeed save directory: `latest` names the subdirectory holding the shards."""
    save = tmp_path / "save"
    W.write_shards(save / "1000", release["sd"], ranks=2, dtype=torch.float32)
    (save / "latest").write_text("1000\n")
    plan, _ = plan_conversion(save, vocab=release["root"] / "vocab.txt", dtype="bf16")
    assert plan.source_format == "megatron" and plan.dtype == torch.bfloat16
    assert [p.name for p in plan.source_files] == ["mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"]
    _assert_refused(tmp_path, release["bminf"], "unsupported dtype 'int4'", "--dtype", "int4")
