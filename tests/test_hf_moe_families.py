"""The Hugging Face mixture-of-experts families (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3) against
transformers on tiny random models, every parameter random: fp32 logits within 1e-5 from both
checkpoint layouts (the published per-expert tensors and transformers' fused 3-D ones, which
give bit-identical cpmctl weights), `cpmctl infer --input` greedy generation token-identical to
transformers' `generate` on a left-padded batch, `convert hf --export` loading back with
AutoModelForCausalLM, the Triton MoE kernels (under the interpreter) giving the torch path's
logits for each routing, and the bad inputs the issue lists (exit 2, one line, nothing written).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
from safetensors.torch import load_file, save_file  # noqa: E402
from test_hf_families import COMMON, PROMPTS, VOCAB, randomize, word_tokenizer  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from cpmctl import hf  # noqa: E402
from cpmctl.checkpoint import load_model  # noqa: E402
from cpmctl.cli import app  # noqa: E402
from cpmctl.moe import MoEFeedForward, set_kernels  # noqa: E402

transformers.logging.set_verbosity_error()
TOL = 1e-5

# name -> (config class, model class, config kwargs, pad token, what our config must show)
MOE_FAMILIES = {
    # k = 2 of 8, softmax over the chosen experts, a sliding window on every layer
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=8, num_experts_per_tok=2, sliding_window=6,
                                                            intermediate_size=48, pad_token_id=None),
                False, {"experts": 8, "top_k": 2, "norm_topk": True}),
    # a sigmoid-gated shared expert, unnormalised top-k, a dense layer (mlp_only_layers), biased q/k/v
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                                                               shared_expert_intermediate_size=48, mlp_only_layers=[1],
                                                               norm_topk_prob=False, pad_token_id=3),
                  True, {"experts": 8, "shared_size": 48, "shared_gate": True, "norm_topk": False,
                         "layers": ["decoder.0", "decoder.2"]}),
    # a sliding window of 3 on layers 0 and 2 (Qwen2MoeConfig's even layers below max_window_layers)
    "qwen2_moe-sliding": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                                                                       shared_expert_intermediate_size=48, norm_topk_prob=True,
                                                                       use_sliding_window=True, sliding_window=3, max_window_layers=3,
                                                                       pad_token_id=3),
                          True, {"experts": 8, "norm_topk": True, "sliding_window": 3, "sliding_layers": [0, 2]}),
    # normalised top-k, per-head q/k norm, decoder_sparse_step 2 (layer 1 sparse only)
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(num_experts=16, num_experts_per_tok=4, moe_intermediate_size=32,
                                                               head_dim=24, norm_topk_prob=True, decoder_sparse_step=2,
                                                               pad_token_id=3),
                  True, {"experts": 16, "top_k": 4, "norm_topk": True, "layers": ["decoder.1"]}),
    # a sliding window of 4 on every layer (Qwen3-MoE's one mask)
    "qwen3_moe-sliding": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                                                                       norm_topk_prob=False, use_sliding_window=True, sliding_window=4,
                                                                       pad_token_id=3),
                          True, {"experts": 8, "norm_topk": False, "sliding_window": 4, "sliding_layers": None}),
    # k = 8 of 64 small experts, q/k norms over all heads, clip_qkv
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=64, num_experts_per_tok=8, intermediate_size=16, clip_qkv=3.0,
                                                     pad_token_id=3, eos_token_id=2),
              True, {"experts": 64, "top_k": 8, "norm_topk": False}),
    # latent attention (q and kv low rank, decoupled rope dims, interleaved pairs, yarn with
    # mscale_all_dim), a dense first layer, 2 shared experts, sigmoid scores with a selection
    # bias, group-limited top-4 (2 of 4 groups), routed_scaling_factor
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2, first_k_dense_replace=1, n_shared_experts=2,
        moe_intermediate_size=16, routed_scaling_factor=2.5, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8,
        qk_rope_head_dim=8, v_head_dim=12, num_key_value_heads=4, pad_token_id=3,
        rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 32,
                         "mscale": 1.0, "mscale_all_dim": 0.707}),
        True, {"experts": 16, "top_k": 4, "scoring": "sigmoid", "score_bias": True, "groups": 4, "topk_groups": 2,
               "routed_scale": 2.5, "shared_size": 32, "layers": ["decoder.1", "decoder.2"]}),
    # without the q bottleneck, rotary dims as two halves, plain rope
    "deepseek_v3-direct": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=0, n_shared_experts=1,
        moe_intermediate_size=16, routed_scaling_factor=1.5, norm_topk_prob=False, q_lora_rank=None, kv_lora_rank=16,
        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, num_key_value_heads=4, rope_interleave=False, pad_token_id=3),
        True, {"experts": 8, "groups": 2, "topk_groups": 1, "norm_topk": False, "layers": None}),
}


def build_moe(name: str, seed: int = 0, **overrides):
    cfg_cls, model_cls, kwargs, _, _ = MOE_FAMILIES[name]
    cfg = getattr(transformers, cfg_cls)(**{**COMMON, **kwargs, **overrides})
    torch.manual_seed(seed)
    model = randomize(getattr(transformers, model_cls)(cfg), seed + 1)
    with torch.no_grad():  # DeepSeek's selection bias is a buffer: random too, at the scores' scale
        gen = torch.Generator().manual_seed(seed + 2)
        for buffer_name, buffer in model.named_buffers():
            if buffer_name.endswith("e_score_correction_bias"):
                buffer.copy_(0.05 * torch.randn(buffer.shape, generator=gen))
    return model


def save_moe(name: str, tmp_path: Path, *, fused: bool = False, seed: int = 0, **overrides):
    model = build_moe(name, seed, **overrides)
    src = tmp_path / f"{name}-{'fused' if fused else 'hf'}"
    model.save_pretrained(src, save_original_format=not fused)
    word_tokenizer(bos=True, pad=MOE_FAMILIES[name][3]).save_pretrained(src)
    return model, src


def batch_inputs():
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(4, VOCAB, (3, 10), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :6] = 0
    return ids, mask, (mask.cumsum(1) - 1).clamp(min=0)


@pytest.mark.parametrize("name", list(MOE_FAMILIES))
def test_moe_family_parity_generation_export(tmp_path, name):
    ref, src = save_moe(name, tmp_path)
    names = load_file(src / "model.safetensors")
    assert any(".experts.0." in n for n in names)  # the published per-expert layout
    ck = hf.import_hf(src, tmp_path / f"{name}-ck")
    ours, handle = load_model(ck)
    handle.close()
    for key, want in MOE_FAMILIES[name][4].items():  # the MoE's settings, or the model's
        assert getattr(ours.config.moe if hasattr(ours.config.moe, key) else ours.config, key) == want, key

    ids, mask, positions = batch_inputs()
    with torch.inference_mode():
        want = ref(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        got = ours(ids, mask, position_ids=positions)
        want_full, got_full = ref(input_ids=ids).logits, ours(ids)
    assert float((want - got).abs()[mask.bool()].max()) <= TOL
    assert float((want_full - got_full).abs().max()) <= TOL

    # transformers' fused 3-D layout imports to the same weights, bit for bit
    _, fused_src = save_moe(name, tmp_path, fused=True)
    assert any(n.endswith("experts.gate_up_proj") for n in load_file(fused_src / "model.safetensors"))
    fused_ck = hf.import_hf(fused_src, tmp_path / f"{name}-fused-ck")
    assert load_file(fused_ck / "model.safetensors").keys() == load_file(ck / "model.safetensors").keys()
    for key, tensor in load_file(fused_ck / "model.safetensors").items():
        assert torch.equal(tensor, load_file(ck / "model.safetensors")[key]), key

    # export: the published layout, which transformers loads as the same family
    exported = hf.export_hf(ck, tmp_path / f"{name}-export")
    assert any(".experts.0." in n for n in load_file(exported / "model.safetensors"))
    back = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    assert type(back) is type(ref)
    with torch.inference_mode():
        assert float((back(input_ids=ids).logits - want_full).abs().max()) <= TOL

    # cpmctl infer --input: greedy, a padded batch of prompts of different lengths
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"text": t}) + "\n" for t in PROMPTS))
    result = CliRunner().invoke(app, ["infer", str(ck), "--input", str(prompts), "--max-new-tokens", "12", "--json"])
    assert result.exit_code == 0, result.output
    outputs = json.loads(result.stdout)["result"]["outputs"]
    tok = word_tokenizer(bos=True, pad=MOE_FAMILIES[name][3])
    tok.padding_side = "left"
    if tok.pad_token is None:  # as Mixtral ships: pad with eos for transformers
        tok.pad_token = tok.eos_token
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.inference_mode():
        out = ref.generate(**batch, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=2)
    for row, o in zip(out[:, batch["input_ids"].shape[1]:].tolist(), outputs):
        row = row[: row.index(2)] if 2 in row else row
        assert o["generated"] == tok.decode(row, skip_special_tokens=True), (o, row)


@pytest.mark.kernels
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs Triton's interpreter (no CUDA) or a GPU run")
# k=2 of 8, k=8 of 64, shared experts, group-limited selection
@pytest.mark.parametrize("name", ["mixtral", "olmoe", "qwen2_moe", "deepseek_v3"])
def test_triton_kernels_match_torch_for_each_routing(tmp_path, name):
    pytest.importorskip("triton")
    _, src = save_moe(name, tmp_path)
    ours, handle = load_model(hf.import_hf(src, tmp_path / "ck"))
    handle.close()
    ids, mask, positions = batch_inputs()
    with torch.inference_mode():
        torch_logits = ours(ids, mask, position_ids=positions)
        assert set_kernels(ours, "triton") == sum(isinstance(m, MoEFeedForward) for m in ours.modules())
        triton_logits = ours(ids, mask, position_ids=positions)
    assert float((torch_logits - triton_logits).abs().max()) <= TOL


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe"])
def test_qwen_moe_sliding_layers_as_transformers_configs_give_them(family):
    """config.json without layer_types: the sliding layers transformers' config class derives from
    use_sliding_window, sliding_window and max_window_layers (Qwen2-MoE: even layers below it;
    Qwen3-MoE: every layer, max_window_layers unused)."""
    cls = getattr(transformers, "Qwen2MoeConfig" if family == "qwen2_moe" else "Qwen3MoeConfig")
    for use, window, below, n in [(True, 5, 28, 7), (True, 5, 3, 7), (True, 2, 0, 4), (False, 5, 28, 6), (True, None, 28, 3)]:
        if family == "qwen2_moe" and use and window is None and below:
            continue  # transformers has no window for its sliding layers; cpmctl refuses it (below)
        ref = cls(use_sliding_window=use, sliding_window=window, max_window_layers=below, num_hidden_layers=n)
        raw = {k: v for k, v in ref.to_dict().items() if k != "layer_types"}
        raw["sliding_window"] = window  # as config.json states it (Qwen2MoeConfig stores 0 when switched off)
        ours = hf.config_from_hf(raw)
        if family == "qwen2_moe":
            want = [i for i, t in enumerate(ref.layer_types) if t == "sliding_attention"]
        else:
            want = list(range(n)) if ref.sliding_window is not None else []
        got = [i for i in range(n) if ours.is_sliding_layer(i)]
        assert got == want, (use, window, below, n)
        if want:
            assert ours.sliding_window == window


# -- bad input: exit 2, one line, nothing written ------------------------------------------------
def convert(src: Path, out: Path):
    result = CliRunner().invoke(app, ["convert", "hf", str(src), str(out)])
    assert result.exit_code == 2, result.output
    assert not out.exists()
    lines = [line for line in result.output.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def edit_config(src: Path, **changes) -> None:
    path = src / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def test_expert_count_disagreeing_with_config(tmp_path):
    _, src = save_moe("mixtral", tmp_path)
    edit_config(src, num_local_experts=6)
    line = convert(src, tmp_path / "out")
    assert "holds 8 experts in layer 0" in line and "says 6" in line
    _, fused = save_moe("mixtral", tmp_path, fused=True)
    edit_config(fused, num_local_experts=10)
    line = convert(fused, tmp_path / "out2")
    assert "holds 8 experts" in line and "says 10" in line


def test_missing_expert_tensor(tmp_path):
    _, src = save_moe("qwen3_moe", tmp_path)
    tensors = load_file(src / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.5.down_proj.weight"]
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    assert "missing HF tensor model.layers.1.mlp.experts.5.down_proj.weight" in convert(src, tmp_path / "out")


def test_top_k_above_expert_count(tmp_path):
    _, src = save_moe("olmoe", tmp_path)
    edit_config(src, num_experts_per_tok=65)
    assert "num_experts_per_tok=65 of 64 experts" in convert(src, tmp_path / "out")


def test_unimplemented_features_are_named(tmp_path):
    # sliding layers transformers gives no window (Qwen2-MoE: 0 positions), and mixed layer types in
    # Qwen3-MoE, whose one mask serves every layer
    _, src = save_moe("qwen2_moe", tmp_path)
    edit_config(src, layer_types=["sliding_attention", "full_attention", "full_attention"])
    assert "names sliding_attention layers in layer_types but use_sliding_window is false" in convert(src, tmp_path / "out")
    edit_config(src, use_sliding_window=True, sliding_window=None)
    assert "names sliding_attention layers in layer_types but no sliding_window" in convert(src, tmp_path / "out")
    _, src = save_moe("qwen3_moe", tmp_path)
    edit_config(src, use_sliding_window=True, sliding_window=4, layer_types=["sliding_attention", "full_attention", "full_attention"])
    assert "unsupported qwen3_moe feature layer_types=" in convert(src, tmp_path / "out")
    for key, value in (("scoring_func", "softmax"), ("topk_method", "group_limited_greedy"), ("moe_layer_freq", 2)):
        _, src = save_moe("deepseek_v3", tmp_path / key)
        edit_config(src, **{key: value})
        assert f"unsupported deepseek_v3 router feature {key}={value!r}" in convert(src, tmp_path / key / "out")
    _, src = save_moe("deepseek_v3", tmp_path / "fp8")
    edit_config(src, quantization_config={"quant_method": "fp8", "fmt": "e4m3"})
    assert "quantization_config (quant_method='fp8')" in convert(src, tmp_path / "fp8" / "out")


# -- DeepSeek-V3's multi-token-prediction layer ----------------------------------------------------
def mtp_tensors(ref, layer: int) -> dict[str, torch.Tensor]:
    """A multi-token-prediction module at model.layers.{layer}, laid out as in the published
    DeepSeek-V3 checkpoints: enorm, hnorm, eh_proj [d, 2d], embed_tokens, a full MoE decoder layer
    (per-expert tensors) and shared_head (norm, head), every tensor random."""
    cfg = ref.config
    block = type(ref.model.layers[-1])(cfg, layer_idx=layer)
    gen = torch.Generator().manual_seed(11)
    d, vocab, p = cfg.hidden_size, cfg.vocab_size, f"model.layers.{layer}."
    out = {f"{p}enorm.weight": torch.randn(d, generator=gen), f"{p}hnorm.weight": torch.randn(d, generator=gen),
           f"{p}eh_proj.weight": torch.randn(d, 2 * d, generator=gen), f"{p}embed_tokens.weight": torch.randn(vocab, d, generator=gen),
           f"{p}shared_head.norm.weight": torch.randn(d, generator=gen), f"{p}shared_head.head.weight": torch.randn(vocab, d, generator=gen)}
    for name, tensor in block.state_dict().items():
        if name == "mlp.experts.gate_up_proj":
            for e, (gate, up) in enumerate(t.chunk(2, dim=0) for t in tensor):
                out[f"{p}mlp.experts.{e}.gate_proj.weight"] = torch.randn(gate.shape, generator=gen)
                out[f"{p}mlp.experts.{e}.up_proj.weight"] = torch.randn(up.shape, generator=gen)
        elif name == "mlp.experts.down_proj":
            for e, down in enumerate(tensor):
                out[f"{p}mlp.experts.{e}.down_proj.weight"] = torch.randn(down.shape, generator=gen)
        else:
            out[p + name] = torch.randn(tensor.shape, generator=gen)
    return out


def test_deepseek_multi_token_prediction_layer_is_dropped(tmp_path, caplog):
    ref, src = save_moe("deepseek_v3", tmp_path)
    edit_config(src, num_nextn_predict_layers=1)
    tensors = load_file(src / "model.safetensors")
    n = ref.config.num_hidden_layers
    mtp = mtp_tensors(ref, n)
    assert {"enorm", "hnorm", "eh_proj", "shared_head"} <= {k.split(".")[3] for k in mtp}
    assert f"model.layers.{n}.mlp.experts.15.down_proj.weight" in mtp and f"model.layers.{n}.self_attn.kv_b_proj.weight" in mtp
    save_file({**tensors, **mtp}, src / "model.safetensors", metadata={"format": "pt"})

    with caplog.at_level("INFO", logger="cpmctl.hf"):
        ck = hf.import_hf(src, tmp_path / "ck")
    notes = [r.getMessage() for r in caplog.records if "multi-token-prediction" in r.getMessage()]
    assert notes == [f"dropped deepseek_v3's multi-token-prediction layers (model.layers.{n}.*, {len(mtp)} tensors): "
                     "cpmctl predicts the next token only"]
    ours, handle = load_model(ck)
    handle.close()
    ids, mask, positions = batch_inputs()
    with torch.inference_mode():
        want = ref(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        got = ours(ids, mask, position_ids=positions)
    assert float((want - got).abs()[mask.bool()].max()) <= TOL
    # transformers loads the same directory to the same model, ignoring the module too
    loaded = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
    with torch.inference_mode():
        assert float((loaded(input_ids=ids).logits - ours(ids)).abs().max()) <= TOL

    # transformers' own key for the count works the same
    edit_config(src, num_nextn_predict_layers=None, num_mtp_layers=1)
    hf.import_hf(src, tmp_path / "ck-mtp-key")

    # only the declared layers are dropped: one more layer, or none declared, is refused
    save_file({**tensors, **mtp, f"model.layers.{n + 1}.enorm.weight": torch.ones(64)}, src / "model.safetensors",
              metadata={"format": "pt"})
    assert f"has 1 HF tensor(s) that cpmctl's deepseek_v3 has no place for: model.layers.{n + 1}.enorm.weight" in convert(
        src, tmp_path / "out")
    save_file({**tensors, **mtp}, src / "model.safetensors", metadata={"format": "pt"})
    edit_config(src, num_mtp_layers=0)
    assert f"has {len(mtp)} HF tensor(s) that cpmctl's deepseek_v3 has no place for" in convert(src, tmp_path / "out2")
