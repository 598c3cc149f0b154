"""The current decoder families (Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma 2, Phi-3) against
transformers on tiny random models: fp32 logits within 1e-5, `cpmctl infer --input` greedy
generation token-identical to transformers' `generate` on a left-padded batch of prompts of
different lengths (with tokenizers shipped as the families ship them: no pad token for Llama,
Mistral and Phi-3), `convert hf --export` loading back with AutoModelForCausalLM, and `cpmctl info`
naming the family. Every parameter is drawn at random, norm weights and biases included.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
from typer.testing import CliRunner  # noqa: E402

from cpmctl import hf  # noqa: E402
from cpmctl.checkpoint import load_model  # noqa: E402
from cpmctl.cli import app  # noqa: E402

transformers.logging.set_verbosity_error()
TOL = 1e-5
VOCAB = 96
WORDS = [f"w{i}" for i in range(VOCAB - 4)]  # ids 4.. ; 0-3 are <unk> <s> </s> <pad>
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random values in every parameter, at scales that keep activations O(1)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if p.dim() == 1 and "norm" in name:
            p.copy_((0.2 if "gemma" in type(model).__name__.lower() else 1.0) + 0.2 * noise)
        elif p.dim() == 1:
            p.copy_(0.1 * noise)
        elif "embed" in name:
            p.copy_(0.5 * noise)
        else:
            p.copy_(noise / p.shape[1] ** 0.5)
    return model.eval()


def word_tokenizer(bos: bool, pad: bool, chat_template: str | None = None):
    """A word-level tokenizer with <unk> <s> </s> (and <pad> when `pad`), bos prepended like Llama's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    kwargs = dict(unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    if pad:
        kwargs["pad_token"] = "<pad>"
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, **kwargs)
    if chat_template:
        fast.chat_template = chat_template
    return fast


COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2)

# name -> (config class, model class, config kwargs, pad token in the tokenizer, what the config must show)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(rope_theta=5000.0, pad_token_id=None), False, {}),
    "llama3-rope": ("LlamaConfig", "LlamaForCausalLM", dict(rope_parameters={
        "rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}), False, {"rope_scaling": "llama3"}),
    "llama-yarn": ("LlamaConfig", "LlamaForCausalLM", dict(rope_parameters={
        "rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 32}), False,
        {"rope_scaling": "yarn"}),
    "llama-linear": ("LlamaConfig", "LlamaForCausalLM", dict(rope_parameters={
        "rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}), False, {"rope_scaling": "linear"}),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=4), False, {"sliding_window": 4}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(pad_token_id=3, tie_word_embeddings=True), True, {"qkv_bias": True}),
    "qwen2-sliding": ("Qwen2Config", "Qwen2ForCausalLM", dict(pad_token_id=3, use_sliding_window=True, sliding_window=3,
                                                             max_window_layers=1), True, {"sliding_layers": [1, 2]}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=24, pad_token_id=3), True, {"qk_norm": True, "d_head": 24}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(head_dim=24, pad_token_id=3, bos_token_id=1, eos_token_id=2), True,
              {"norm_offset": 1.0, "scale_embeddings": True, "activation": "gelu_tanh", "d_head": 24}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(head_dim=24, pad_token_id=3, sliding_window=4, query_pre_attn_scalar=20,
                                                        attn_logit_softcapping=2.0, final_logit_softcapping=3.0), True,
               {"post_norms": True, "sliding_layers": [0, 2], "attn_softcap": 2.0, "logit_softcap": 3.0}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(pad_token_id=None, partial_rotary_factor=0.5, sliding_window=5), False,
             {"rotary_dim": 8, "sliding_window": 5}),
}


def build(name: str, seed: int = 0):
    cfg_cls, model_cls, kwargs, with_pad, _ = FAMILIES[name]
    cfg = getattr(transformers, cfg_cls)(**{**COMMON, **kwargs})
    torch.manual_seed(seed)
    return randomize(getattr(transformers, model_cls)(cfg), seed + 1), with_pad


def save_hf(name: str, tmp_path: Path, seed: int = 0):
    model, with_pad = build(name, seed)
    src = tmp_path / f"{name}-hf"
    model.save_pretrained(src)
    word_tokenizer(bos=True, pad=with_pad).save_pretrained(src)
    return model, src


PROMPTS = ["w5 w9 w17 w3", "w40", "w11 w12 w13 w14 w15 w16 w30", "w60 w61"]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_parity_generation_export(tmp_path, name):
    ref, src = save_hf(name, tmp_path)
    ck = hf.import_hf(src, tmp_path / f"{name}-ck")
    ours, handle = load_model(ck)
    handle.close()
    c = ours.config
    for key, want in FAMILIES[name][4].items():
        got = getattr(c, key)
        assert (got.get("rope_type") if isinstance(got, dict) else got) == want, key

    # fp32 logits, a left-padded batch
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(4, VOCAB, (3, 10), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :6] = 0
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.inference_mode():
        want = ref(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        got = ours(ids, mask, position_ids=positions)
        want_full, got_full = ref(input_ids=ids).logits, ours(ids)
    assert float((want - got).abs()[mask.bool()].max()) <= TOL
    assert float((want_full - got_full).abs().max()) <= TOL

    # export: transformers loads it, same logits
    exported = hf.export_hf(ck, tmp_path / f"{name}-export")
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
    tok = word_tokenizer(bos=True, pad=FAMILIES[name][3])  # as saved (AutoTokenizer may pick the family's own class)
    tok.padding_side = "left"
    batch = tok(PROMPTS, return_tensors="pt", padding=True) if tok.pad_token else None
    if batch is None:  # no pad token, as these families ship: pad with eos for transformers
        tok.pad_token = tok.eos_token
        batch = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.inference_mode():
        out = ref.generate(**batch, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=2)
    for row, o in zip(out[:, batch["input_ids"].shape[1]:].tolist(), outputs):
        row = row[: row.index(2)] if 2 in row else row
        assert o["generated"] == tok.decode(row, skip_special_tokens=True), (o, row)

    info = CliRunner().invoke(app, ["info", str(ck), "--json"])
    assert info.exit_code == 0
    assert json.loads(info.stdout)["result"]["family"] == ref.config.model_type
