"""Writers of the two released CPM-2 formats, from the formats as the public code defines them,
for tests and the conversion benchmark. Not cpmctl code: the converter must read what these
write without sharing a line with them.

- BMInf's checkpoint.pt (OpenBMB/BMInf core/layer.py dump order; dtype codes 0 int8, 1 fp16,
  2 fp32 as deepdialog/CPM-2.0-GEN reads them; int8 weights with a `<name>_scale` sibling of
  max|w| / 127 per output row, as BMInf's converter quantizes).
- CPM-2-Finetune's mp_rank_XX_model_states.pt ({"module": state_dict, ...}, each rank holding
  its slice of the column/row-parallel weights, mpu/transformer_enc_dec.py).
"""

from __future__ import annotations

import struct
from pathlib import Path

import torch

CODES = {torch.int8: 0, torch.float16: 1, torch.float32: 2}


# -- a model's tensors, in the training release's names (full, unsplit) -------------------------------
def random_cpm2(vocab: int, d: int, heads: int, d_head: int, d_ff: int, n_enc: int, n_dec: int, buckets: int = 32,
                seed: int = 0) -> dict[str, torch.Tensor]:
    """Every parameter random (norms around 1), named as CPM-2-Finetune's EncDecModel names them."""
    g = torch.Generator().manual_seed(seed)
    inner = heads * d_head

    def w(rows: int, cols: int) -> torch.Tensor:
        return torch.randn(rows, cols, generator=g) / cols**0.5

    def norm() -> torch.Tensor:
        return 1.0 + 0.2 * torch.randn(d, generator=g)

    sd = {"word_embeds.weight": 0.5 * torch.randn(vocab, d, generator=g), "lm_head.weight": w(vocab, d)}
    for stack, count in (("encoder", n_enc), ("decoder", n_dec)):
        sd[f"{stack}.blocks.0.self_attn.self_attn.relative_attention_bias.weight"] = 0.5 * torch.randn(buckets, heads, generator=g)
        for i in range(count):
            p = f"{stack}.blocks.{i}"
            sd[f"{p}.self_attn.layer_norm.weight"] = norm()
            sd[f"{p}.self_attn.self_attn.project.weight"] = w(3 * inner, d)
            sd[f"{p}.self_attn.self_attn.dense.weight"] = w(d, inner)
            if stack == "decoder":
                sd[f"{p}.cross_attn.layer_norm.weight"] = norm()
                sd[f"{p}.cross_attn.cross_attn.project_q.weight"] = w(inner, d)
                sd[f"{p}.cross_attn.cross_attn.project_kv.weight"] = w(2 * inner, d)
                sd[f"{p}.cross_attn.cross_attn.dense.weight"] = w(d, inner)
            sd[f"{p}.ff.layer_norm.weight"] = norm()
            sd[f"{p}.ff.dense_relu_dense.wi_0.weight"] = w(d_ff, d)
            sd[f"{p}.ff.dense_relu_dense.wi_1.weight"] = w(d_ff, d)
            sd[f"{p}.ff.dense_relu_dense.wo.weight"] = w(d, d_ff)
        sd[f"{stack}.final_layernorm.weight"] = norm()
    return sd


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8, fp16 scale [..., 1]) with scale = max|w| / 127 over the last dim."""
    scale = (w.abs().amax(dim=-1, keepdim=True) / 127).to(torch.float16)
    q = torch.round(w / scale.float()).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()


# -- BMInf ---------------------------------------------------------------------------------------------
def bminf_tree(sd: dict[str, torch.Tensor], heads: int, *, quantized: bool = True, embed_dtype=torch.float16):
    """BMInf's layer tree for a training-release state dict: {"params": {name: tensor}, "layers": {...}}.

    Returns (tree, effective): `effective` holds the values the tree's tensors stand for in
    float32 (dequantized, or rounded to fp16), in the training release's names, for building the
    reference model.
    """
    eff = {k: v.clone() for k, v in sd.items()}

    def leaf(params: dict) -> dict:
        return {"params": params, "layers": {}}

    def matrix(name: str, value: torch.Tensor, key: str, eff_names: list[str], shape=None) -> dict:
        if quantized:
            q, s = quantize(value)
            full = dequantize(q, s)
            params = {key: q, key + "_scale": s}
        else:
            full = value.to(torch.float16).float()
            params = {key: value.to(torch.float16)}
        if shape is not None:
            params = {k: v.reshape(*shape, *v.shape[-1:]) if k == key else v.reshape(*shape, 1) for k, v in params.items()}
        flat = full.reshape(-1, full.shape[-1])
        rows = flat.shape[0] // len(eff_names)
        for j, n in enumerate(eff_names):
            eff[n] = flat[j * rows:(j + 1) * rows].clone()
        return params

    def block(stack: str, i: int) -> dict:
        p = f"{stack}.blocks.{i}"
        inner = sd[f"{p}.self_attn.self_attn.dense.weight"].shape[1]
        layers = {
            "layer_nrom_before_self_attn": leaf({"weight": sd[f"{p}.self_attn.layer_norm.weight"]}),
            "self_attention": leaf({
                **matrix("qkv", sd[f"{p}.self_attn.self_attn.project.weight"].reshape(3, inner, -1), "w_project_qkv",
                         [f"{p}.self_attn.self_attn.project.weight"]),
                **matrix("o", sd[f"{p}.self_attn.self_attn.dense.weight"], "w_out", [f"{p}.self_attn.self_attn.dense.weight"]),
            }),
        }
        if stack == "decoder":
            layers["layer_nrom_before_cross_attn"] = leaf({"weight": sd[f"{p}.cross_attn.layer_norm.weight"]})
            layers["cross_attention"] = leaf({
                **matrix("q", sd[f"{p}.cross_attn.cross_attn.project_q.weight"], "w_project_q", [f"{p}.cross_attn.cross_attn.project_q.weight"]),
                **matrix("o", sd[f"{p}.cross_attn.cross_attn.dense.weight"], "w_out", [f"{p}.cross_attn.cross_attn.dense.weight"]),
            })
        layers["layer_nrom_before_ff"] = leaf({"weight": sd[f"{p}.ff.layer_norm.weight"]})
        layers["dense_gelu_dense"] = {"params": {}, "layers": {
            k: leaf(matrix(k, sd[f"{p}.ff.dense_relu_dense.{k}.weight"], "weight", [f"{p}.ff.dense_relu_dense.{k}.weight"]))
            for k in ("wi_0", "wi_1", "wo")
        }}
        return {"params": {}, "layers": layers}

    n_enc = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.blocks."))
    n_dec = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("decoder.blocks."))
    emb = sd["word_embeds.weight"].to(embed_dtype)
    eff["word_embeds.weight"] = emb.float()
    kv = torch.stack([sd[f"decoder.blocks.{i}.cross_attn.cross_attn.project_kv.weight"] for i in range(n_dec)])
    inner = kv.shape[1] // 2
    kv_params = matrix("kv", kv.reshape(n_dec * 2 * inner, -1), "w_project_kv",
                       [f"decoder.blocks.{i}.cross_attn.cross_attn.project_kv.weight" for i in range(n_dec)],
                       shape=(n_dec, 2, inner))
    tree = {"params": {}, "layers": {
        "input_embedding": leaf({"weight": emb}),
        "encoder_position_bias": {"params": {}, "layers": {"embedding": leaf(
            {"weight": sd["encoder.blocks.0.self_attn.self_attn.relative_attention_bias.weight"]})}},
        "encoder": {"params": {}, "layers": {str(i): block("encoder", i) for i in range(n_enc)}},
        "encoder_final_layer_nrom": leaf({"weight": sd["encoder.final_layernorm.weight"]}),
        "decoder_position_bias": {"params": {}, "layers": {"embedding": leaf(
            {"weight": sd["decoder.blocks.0.self_attn.self_attn.relative_attention_bias.weight"]})}},
        "encoder_kv": leaf(kv_params),
        "lm_head": leaf(matrix("head", sd["lm_head.weight"], "weight", ["lm_head.weight"])),
        "decoder": {"params": {}, "layers": {str(i): block("decoder", i) for i in range(n_dec)}},
        "decoder_final_layer_nrom": leaf({"weight": sd["decoder.final_layernorm.weight"]}),
    }}
    return tree, eff


def _string(fh, s: str) -> None:
    raw = s.encode("utf-8")
    fh.write(struct.pack("<I", len(raw)))
    fh.write(raw)


def random_fill(seed: int = 0):
    """Data for a (shape, dtype) leaf made on the fly: int8 in [-127, 127], positive fp16 scales
    that keep a dequantized row's norm near one, norms near 1, small embeddings."""
    g = torch.Generator().manual_seed(seed)

    def fill(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if dtype == torch.int8:
            return torch.randint(-127, 128, shape, generator=g, dtype=torch.int8)
        if name.endswith("_scale"):
            return torch.full(shape, 1.0 / (127 * 60), dtype=dtype)
        if len(shape) == 1:
            return (1.0 + 0.2 * torch.randn(shape, generator=g)).to(dtype)
        return (0.5 * torch.randn(shape, generator=g) / shape[-1] ** 0.5).to(dtype)

    return fill


def write_bminf(path: Path, tree: dict, *, sparse: bool = False, code_override: dict | None = None,
                fill=None) -> None:
    """Dump a layer tree in BMInf's layout. `sparse`: seek over the data (a header-only file of
    the real size); `code_override`: {parameter name: dtype code} to write a wrong code; `fill`:
    makes the data of (shape, dtype) leaves one at a time (see `random_fill`)."""
    code_override = code_override or {}

    def layer(fh, node: dict, prefix: str) -> None:
        fh.write(struct.pack("<II", len(node["params"]), len(node["layers"])))
        for name, value in node["params"].items():
            _string(fh, name)
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else value[0]
            dtype = value.dtype if isinstance(value, torch.Tensor) else value[1]
            fh.write(struct.pack("<B", len(shape)))
            for dim in shape:
                fh.write(struct.pack("<I", dim))
            nbytes = dtype.itemsize * int(torch.Size(shape).numel())
            fh.write(struct.pack("<I", nbytes))
            fh.write(struct.pack("<B", code_override.get(prefix + name, CODES[dtype])))
            if sparse:
                fh.seek(nbytes, 1)
                continue
            if not isinstance(value, torch.Tensor):
                value = fill(prefix + name, shape, dtype)
            fh.write(value.contiguous().view(torch.uint8).numpy().tobytes())
        for name, sub in node["layers"].items():
            _string(fh, name)
            layer(fh, sub, prefix + name + ".")

    with open(path, "wb") as fh:
        layer(fh, tree, "")
        fh.truncate(fh.tell())


# -- model-parallel shards -------------------------------------------------------------------------
def split_rank(name: str, value: torch.Tensor, ranks: int, r: int) -> torch.Tensor:
    """Rank r's slice of a full tensor, as Megatron's column/row-parallel layers hold it."""
    if name.endswith(("layer_norm.weight", "final_layernorm.weight")):
        return value.clone()
    if name.endswith("self_attn.self_attn.project.weight") or name.endswith("project_kv.weight"):
        parts = 3 if name.endswith("project.weight") else 2
        return torch.cat([p.chunk(ranks, 0)[r] for p in value.chunk(parts, 0)], 0).clone()
    if name.endswith(("relative_attention_bias.weight", ".dense.weight", "wo.weight")):
        return value.chunk(ranks, 1)[r].clone()
    return value.chunk(ranks, 0)[r].clone()


def write_shards(directory: Path, sd: dict[str, torch.Tensor], ranks: int, dtype=torch.float16) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for r in range(ranks):
        module = {name: split_rank(name, v, ranks, r).to(dtype) for name, v in sd.items()}
        # The encoder and decoder keep the shared embedding as a submodule: saved under two more names.
        module["encoder.word_embeds.weight"] = module["word_embeds.weight"]
        module["decoder.word_embeds.weight"] = module["word_embeds.weight"]
        torch.save({"module": module, "iteration": 1000, "mp_world_size": ranks, "dp_world_size": 1},
                   directory / f"mp_rank_{r:02d}_model_states.pt")


# -- vocabulary ----------------------------------------------------------------------------------------
def write_vocab(path: Path, words: list[str], size: int) -> list[str]:
    """A CPM-2-style vocab.txt: specials, `words`, fillers, then the 190 sentinels; `size` lines."""
    head = ["<unk>", "<pad>", "<eod>", *words]
    sentinels = [f"<s_{i}>" for i in range(190)]
    fill = [f"[f{i}]" for i in range(size - len(head) - len(sentinels))]
    lines = head + fill + sentinels
    assert len(lines) == size
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return lines


def shape_tree(vocab: int, d: int, heads: int, d_head: int, d_ff: int, n_enc: int, n_dec: int, buckets: int = 32) -> dict:
    """BMInf's layer tree with (shape, dtype) in place of tensors, for a header-only file of a
    real-size model: int8 matrices with fp16 row scales, fp16 embedding and head, fp32 norms."""
    inner = heads * d_head
    i8, f16, f32 = torch.int8, torch.float16, torch.float32

    def leaf(params: dict) -> dict:
        return {"params": params, "layers": {}}

    def mat(key: str, *shape: int) -> dict:
        return {key: (shape, i8), key + "_scale": ((*shape[:-1], 1), f16)}

    def block(decoder: bool) -> dict:
        layers = {
            "layer_nrom_before_self_attn": leaf({"weight": ((d,), f32)}),
            "self_attention": leaf({**mat("w_project_qkv", 3, inner, d), **mat("w_out", d, inner)}),
        }
        if decoder:
            layers["layer_nrom_before_cross_attn"] = leaf({"weight": ((d,), f32)})
            layers["cross_attention"] = leaf({**mat("w_project_q", inner, d), **mat("w_out", d, inner)})
        layers["layer_nrom_before_ff"] = leaf({"weight": ((d,), f32)})
        layers["dense_gelu_dense"] = {"params": {}, "layers": {
            "wi_0": leaf(mat("weight", d_ff, d)), "wi_1": leaf(mat("weight", d_ff, d)), "wo": leaf(mat("weight", d, d_ff))}}
        return {"params": {}, "layers": layers}

    bias = {"params": {}, "layers": {"embedding": leaf({"weight": ((buckets, heads), f32)})}}
    return {"params": {}, "layers": {
        "input_embedding": leaf({"weight": ((vocab, d), f16)}),
        "encoder_position_bias": bias,
        "encoder": {"params": {}, "layers": {str(i): block(False) for i in range(n_enc)}},
        "encoder_final_layer_nrom": leaf({"weight": ((d,), f32)}),
        "decoder_position_bias": bias,
        "encoder_kv": leaf(mat("w_project_kv", n_dec, 2, inner, d)),
        "lm_head": leaf({"weight": ((vocab, d), f16)}),
        "decoder": {"params": {}, "layers": {str(i): block(True) for i in range(n_dec)}},
        "decoder_final_layer_nrom": leaf({"weight": ((d,), f32)}),
    }}
