"""Model configuration: one dataclass for every architecture cpmctl runs, plus named presets.

A preset is data (a dict of overrides), not a class. `ModelConfig.from_preset("cpm2-11b")`
builds the CPM-2 encoder-decoder; the small presets serve tests and the demo.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from cpmctl.errors import UserError
from cpmctl.options import check_field_types

ARCHS = ("encoder-decoder", "encoder", "decoder")
NORMS = ("rms", "layer")
NORM_POSITIONS = ("pre", "post")
POSITIONS = ("relative", "absolute", "rotary")
ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu", "drelu")
# Activations whose zeros are exact (ReLU-fied models): MoEfication splits by their zero pattern.
RELU_ACTIVATIONS = ("relu", "drelu")
MOE_ROUTERS = ("linear", "center", "mlp", "oracle")
# How a linear router turns logits into expert scores (Hugging Face MoE families).
MOE_SCORINGS = ("softmax", "sigmoid")
# Rotary scalings cpmctl computes exactly as transformers does (modeling_rope_utils); "dynamic"
# NTK and "longrope" depend on the sequence seen at run time and are refused at import.
ROPE_SCALINGS = ("linear", "llama3", "yarn")


@dataclass
class MoEConfig:
    """Mixture-of-experts layout of the FFNs.

    Each expert is a block of `expert_size` FFN neurons: MoEfication splits one dense FFN into
    `experts` blocks (experts * expert_size == d_ff), CPM-2's upcycling copies the whole FFN into
    every expert (expert_size == d_ff). `layers` names the FFNs that are MoE, as
    "encoder.3" / "decoder.0" (None: all of them).
    """

    experts: int
    expert_size: int
    top_k: int = 1
    router: str = "linear"
    layers: list[str] | None = None
    # MoEfication: each layer stores the neuron permutation (`perm`) that restores the dense FFN;
    # `ratio` records the fraction of experts per token that top_k was derived from.
    permuted: bool = False
    ratio: float | None = None
    # Skipped experts contribute their output at typical activations (buffers act_fill, fill_out).
    fill_skipped: bool = False
    # The linear router's scoring (the Hugging Face MoE families; the defaults are cpmctl's own
    # router: softmax over the k selected logits). `scoring`: softmax over all experts or an
    # independent sigmoid per expert. `norm_topk`: the k selected scores are divided by their
    # sum (softmax + norm_topk is the softmax over the selected logits). `score_bias`: a learned
    # per-expert bias (buffer `score_bias`) added to the scores to choose experts, not to weight
    # them (DeepSeek-V3's e_score_correction_bias). `groups` / `topk_groups`: experts split into
    # `groups` equal groups; a token picks its top_k among the experts of its best `topk_groups`
    # groups, a group scored by the sum of its two best scores. `routed_scale`: the routed
    # experts' weights are multiplied by it.
    scoring: str = "softmax"
    norm_topk: bool = True
    score_bias: bool = False
    groups: int = 1
    topk_groups: int = 1
    routed_scale: float = 1.0
    # An always-on shared expert of `shared_size` neurons (0: none) added to the routed output,
    # scaled by sigmoid(w . x) with `shared_gate` (Qwen2-MoE); DeepSeek's n shared experts are one
    # FFN of n * expert_size neurons.
    shared_size: int = 0
    shared_gate: bool = False

    def __post_init__(self) -> None:
        if self.experts < 1 or self.expert_size < 1:
            raise UserError(f"MoE needs experts >= 1 and expert_size >= 1, got {self.experts} and {self.expert_size}")
        if not 1 <= self.top_k <= self.experts:
            raise UserError(f"MoE top_k must be in 1..{self.experts}, got {self.top_k}")
        if self.router not in MOE_ROUTERS:
            raise UserError(f"unknown MoE router {self.router!r}; expected one of {', '.join(MOE_ROUTERS)}")
        if self.scoring not in MOE_SCORINGS:
            raise UserError(f"unknown MoE scoring {self.scoring!r}; expected one of {', '.join(MOE_SCORINGS)}")
        if not self.plain_routing and self.router != "linear":
            raise UserError(f"MoE scoring, score bias, expert groups and scaling apply to the linear router, not {self.router!r}")
        if self.groups < 1 or self.experts % self.groups:
            raise UserError(f"MoE expert groups must divide the {self.experts} experts, got {self.groups}")
        if not 1 <= self.topk_groups <= self.groups:
            raise UserError(f"MoE topk_groups must be in 1..{self.groups}, got {self.topk_groups}")
        if self.groups > 1 and self.top_k > self.topk_groups * (self.experts // self.groups):
            raise UserError(f"MoE top_k {self.top_k} exceeds the {self.topk_groups * (self.experts // self.groups)} experts "
                            f"of the {self.topk_groups} groups a token may use")
        if self.groups > 1 and self.experts // self.groups < 2:
            raise UserError("MoE expert groups score by their two best experts, so each group needs at least 2")
        if self.shared_size < 0 or (self.shared_gate and not self.shared_size):
            raise UserError(f"MoE shared_size must be >= 0 (and > 0 with a shared gate), got {self.shared_size}")

    @property
    def plain_routing(self) -> bool:
        """The router's scores are cpmctl's own: softmax over the selected logits, nothing else."""
        return (self.scoring == "softmax" and self.norm_topk and not self.score_bias and self.groups == 1
                and self.routed_scale == 1.0)


@dataclass
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2/V3): queries through an optional low-rank
    bottleneck (`q_lora_rank`, None: one projection), keys and values expanded per head from a
    shared latent of `kv_lora_rank` dims, which is what the KV cache holds, plus one
    `qk_rope_dim`-wide rotary key shared by all heads. Each q/k head is `qk_nope_dim` unrotated
    dims followed by `qk_rope_dim` rotated ones (ModelConfig.d_head is their sum, rotary_dim the
    rotated part); value heads are `v_head_dim` wide. `rope_interleave`: the rotated dims are
    stored as interleaved pairs (x0, x1), (x2, x3), ... rather than two halves."""

    kv_lora_rank: int
    qk_nope_dim: int
    qk_rope_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None
    rope_interleave: bool = True

    def __post_init__(self) -> None:
        for name in ("kv_lora_rank", "qk_nope_dim", "qk_rope_dim", "v_head_dim"):
            if getattr(self, name) < 1:
                raise UserError(f"MLA {name} must be >= 1, got {getattr(self, name)}")
        if self.q_lora_rank is not None and self.q_lora_rank < 1:
            raise UserError(f"MLA q_lora_rank must be >= 1 or none, got {self.q_lora_rank}")
        if self.qk_rope_dim % 2:
            raise UserError(f"MLA qk_rope_dim must be even, got {self.qk_rope_dim}")


QUANT_SCHEMES = ("int8", "int4")
# Group sizes the int4 kernels take (torch's CPU kernel and cpmctl's Triton kernels).
QUANT_GROUP_SIZES = (32, 64, 128, 256)
# int4's group size when none is asked for (quantize and infer --dtype int4).
DEFAULT_INT4_GROUP = 64
# What a checkpoint's quantization covers: the routed experts' stacks, or the dense linear layers
# of attention and FFN, with the untied output projection when QuantConfig.output says so
# (embeddings, norms and routers stay float).
QUANT_WEIGHTS = ("experts", "linear")


@dataclass
class QuantConfig:
    """Weight-only quantization of some linear weights (format and matmul: cpmctl.quant).

    `scheme` int8 keeps one scale per output row (group_size None); int4 one scale and zero per
    `group_size` inputs. `weights` names what is quantized: "experts", the routed experts'
    w_in / w_gate / w_out; "linear", the nn.Linear layers of every block's attention and dense
    FFN (cpmctl.quant.quantizable_linears); every other weight stays as it was. `output`
    (with "linear"): the untied output projection is quantized too, as llama.cpp's q8_0/q4_0 files
    have it (False in checkpoints written before it existed).
    """

    scheme: str
    group_size: int | None = None
    weights: str = "experts"
    output: bool = False

    def __post_init__(self) -> None:
        if self.scheme not in QUANT_SCHEMES:
            raise UserError(f"unknown quantization {self.scheme!r}; expected one of {', '.join(QUANT_SCHEMES)}")
        if self.scheme == "int8" and self.group_size is not None:
            raise UserError(f"int8 keeps one scale per output row (the fused kernel's layout); a group size "
                            f"({self.group_size}) applies to int4 only", option="group_size")
        if self.scheme == "int4" and self.group_size not in QUANT_GROUP_SIZES:
            raise UserError(f"unsupported int4 group size {self.group_size}; expected one of "
                            f"{', '.join(map(str, QUANT_GROUP_SIZES))}", option="group_size")
        if self.weights not in QUANT_WEIGHTS:
            raise UserError(f"unknown quantized weights {self.weights!r}; expected one of {', '.join(QUANT_WEIGHTS)}")


@dataclass
class ModelConfig:
    """Everything needed to build a model; stored as config.json in a checkpoint.

    `n_layers` counts the encoder layers (encoder-decoder, encoder) or the decoder layers
    (decoder-only); `n_decoder_layers` counts the decoder of an encoder-decoder.
    `norm_position="post"` is BERT's residual-then-LayerNorm with a norm after the embeddings;
    "pre" normalises each sublayer's input and adds a final norm (T5, Llama, GPT-2).
    """

    arch: str
    vocab_size: int
    d_model: int
    n_heads: int
    d_ff: int
    n_layers: int
    n_decoder_layers: int | None = None
    d_head: int | None = None
    n_kv_heads: int | None = None
    norm: str = "rms"
    norm_position: str = "pre"
    norm_eps: float = 1e-6
    position: str = "relative"
    max_positions: int = 512
    relative_buckets: int = 32
    relative_max_distance: int = 128
    rope_theta: float = 10000.0
    activation: str = "gelu_tanh"
    gated: bool = True
    bias: bool = False
    attn_scale: bool = True
    type_vocab_size: int = 0
    tie_embeddings: bool = False
    scale_tied_logits: bool = False
    lm_head: bool = True
    lm_head_transform: bool = False
    lm_head_bias: bool = False
    dropout: float = 0.0
    # Parameter sharing (ALBERT-style): share_layers=True runs one block per stack n_layers times;
    # share_groups=G keeps G distinct blocks, block g applied n_layers/G consecutive times (G = 1 is
    # share_layers). Giving share_groups implies share_layers.
    share_layers: bool = False
    share_groups: int | None = None
    moe: MoEConfig | None = None
    # mla: multi-head latent attention instead of q/k/v projections (DeepSeek-V3).
    mla: MLAConfig | None = None
    pad_token_id: int = 0
    eos_token_id: int | None = 1
    bos_token_id: int | None = None
    decoder_start_token_id: int | None = None
    init_std: float = 0.02
    # Features of current decoder families (each computes nothing extra unless set):
    # qkv_bias: biases on the q, k and v projections even when `bias` is false (Qwen2).
    qkv_bias: bool = False
    # qk_norm: an RMSNorm over each head of q and of k, before the rotation (Qwen3).
    qk_norm: bool = False
    # qk_norm_full: those norms cover each whole projection, all heads at once (OLMoE).
    qk_norm_full: bool = False
    # clip_qkv: q, k and v clamped to [-clip_qkv, clip_qkv] after projection (and q/k norm) (OLMoE).
    clip_qkv: float | None = None
    # norm_offset: RMSNorm scales by (norm_offset + weight), computed in fp32 (Gemma's 1 + w).
    norm_offset: float = 0.0
    # scale_embeddings: token embeddings times sqrt(d_model) (Gemma).
    scale_embeddings: bool = False
    # rotary_dim: rotate only the first rotary_dim dimensions of each head (partial rotary).
    rotary_dim: int | None = None
    # rope_scaling: {"rope_type": one of ROPE_SCALINGS, "factor": ..., ...} with transformers' keys.
    rope_scaling: dict[str, Any] | None = None
    # sliding_window: a query sees the keys of the last sliding_window positions only (Mistral);
    # sliding_layers: the layer applications that do (None: all), e.g. Gemma 2's even layers.
    sliding_window: int | None = None
    sliding_layers: list[int] | None = None
    # query_scale: attention scores are q.k * query_scale (None: 1/sqrt(d_head), or 1 without
    # attn_scale); Gemma 2's query_pre_attn_scalar ** -0.5.
    query_scale: float | None = None
    # attn_softcap / logit_softcap: cap * tanh(x / cap) on attention scores / output logits (Gemma 2).
    attn_softcap: float | None = None
    logit_softcap: float | None = None
    # post_norms: a norm on each sublayer's output before the residual add (Gemma 2's sandwich).
    post_norms: bool = False
    # Weight-only quantized weights (cpmctl quantize); None: every weight in its float dtype.
    quantization: QuantConfig | None = None
    # threshold_sparsity: the FFNs skip the small activations (TEAL-style): the fraction of FFN
    # inputs and hidden activations, per layer, that their stored magnitude thresholds
    # (`threshold_in`, `threshold_hidden`) were calibrated to zero. None: dense FFNs.
    threshold_sparsity: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            self.moe = MoEConfig(**self.moe)
        if isinstance(self.mla, dict):
            self.mla = MLAConfig(**self.mla)
        if isinstance(self.quantization, dict):
            self.quantization = QuantConfig(**self.quantization)
        if self.d_head is None:
            if self.d_model % self.n_heads:
                raise UserError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}; set d_head")
            self.d_head = self.d_model // self.n_heads
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.arch == "encoder-decoder" and self.n_decoder_layers is None:
            self.n_decoder_layers = self.n_layers
        if self.share_groups is not None:
            self.share_layers = True
        self.validate()

    def validate(self) -> None:
        def check(value: str, allowed: tuple[str, ...], what: str) -> None:
            if value not in allowed:
                raise UserError(f"unknown {what} {value!r}; expected one of {', '.join(allowed)}")

        check(self.arch, ARCHS, "architecture")
        check(self.norm, NORMS, "norm")
        check(self.norm_position, NORM_POSITIONS, "norm position")
        check(self.position, POSITIONS, "position encoding")
        check(self.activation, ACTIVATIONS, "activation")
        if self.activation == "drelu" and not self.gated:
            raise UserError("activation drelu (a ReLU on both branches) needs a gated FFN")
        if self.threshold_sparsity is not None and not 0 < self.threshold_sparsity < 1:
            raise UserError(f"threshold_sparsity must be in (0, 1), got {self.threshold_sparsity}")
        for name in ("vocab_size", "d_model", "n_heads", "d_ff", "n_layers"):
            if getattr(self, name) < 1:
                raise UserError(f"config field {name} must be >= 1, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise UserError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.position == "rotary" and self.d_head % 2:
            raise UserError(f"rotary positions need an even d_head, got {self.d_head}")
        if self.rotary_dim is not None and (self.rotary_dim < 2 or self.rotary_dim % 2 or self.rotary_dim > self.d_head):
            raise UserError(f"rotary_dim must be even and in 2..d_head={self.d_head}, got {self.rotary_dim}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type") if isinstance(self.rope_scaling, dict) else None
            if kind not in ROPE_SCALINGS:
                raise UserError(f"unknown rope scaling {kind!r}; expected one of {', '.join(ROPE_SCALINGS)}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise UserError(f"sliding_window must be >= 1, got {self.sliding_window}")
        if self.sliding_layers is not None and self.sliding_window is None:
            raise UserError("sliding_layers needs a sliding_window")
        if self.mla is not None:
            mla = self.mla
            if self.arch != "decoder" or self.position != "rotary":
                raise UserError("multi-head latent attention is for rotary decoder-only models")
            if self.d_head != mla.qk_nope_dim + mla.qk_rope_dim or self.rotary_dim != mla.qk_rope_dim:
                raise UserError(f"with MLA, d_head must be qk_nope_dim + qk_rope_dim = {mla.qk_nope_dim + mla.qk_rope_dim} "
                                f"and rotary_dim qk_rope_dim = {mla.qk_rope_dim}, got {self.d_head} and {self.rotary_dim}")
            if self.qk_norm or self.qkv_bias or self.bias or self.sliding_window is not None or self.attn_softcap is not None:
                raise UserError("MLA takes none of qk_norm, qkv_bias, bias, sliding_window or attn_softcap")
        if self.qk_norm_full and not self.qk_norm:
            raise UserError("qk_norm_full needs qk_norm")
        for name in ("attn_softcap", "logit_softcap", "query_scale", "clip_qkv"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise UserError(f"{name} must be > 0, got {value}")
        if self.arch != "encoder-decoder" and self.n_decoder_layers not in (None, 0):
            raise UserError(f"n_decoder_layers applies only to encoder-decoder models, not {self.arch}")
        if self.share_groups is not None:
            if self.share_groups < 1:
                raise UserError(f"share_groups must be >= 1, got {self.share_groups}")
            for stack, depth in self.stack_depths().items():
                if depth % self.share_groups:
                    raise UserError(f"{stack} depth {depth} is not a multiple of share_groups {self.share_groups} "
                                    "(each shared block is repeated depth / share_groups times)")

    # -- derived properties -------------------------------------------------------------------
    @property
    def has_encoder(self) -> bool:
        return self.arch in ("encoder-decoder", "encoder")

    @property
    def has_decoder(self) -> bool:
        return self.arch in ("encoder-decoder", "decoder")

    @property
    def is_causal_lm(self) -> bool:
        return self.arch == "decoder"

    @property
    def start_token_id(self) -> int:
        """First decoder input of an encoder-decoder (T5 uses the pad id)."""
        return self.pad_token_id if self.decoder_start_token_id is None else self.decoder_start_token_id

    def stack_depths(self) -> dict[str, int]:
        """Layer applications of each stack the model has: {"encoder": L, "decoder": L'}."""
        depths = {}
        if self.has_encoder:
            depths["encoder"] = self.n_layers
        if self.has_decoder:
            depths["decoder"] = self.n_decoder_layers if self.arch == "encoder-decoder" else self.n_layers
        return depths

    @property
    def shared_blocks(self) -> int | None:
        """Distinct blocks per stack of a parameter-shared model (G), None without sharing."""
        if not self.share_layers:
            return None
        return 1 if self.share_groups is None else self.share_groups

    def blocks_in_stack(self, stack: str) -> int:
        """How many distinct blocks (and block.{i} checkpoint prefixes) `stack` has."""
        return self.shared_blocks or self.stack_depths()[stack]

    def is_sliding_layer(self, index: int) -> bool:
        """Whether decoder layer application `index` attends through the sliding window."""
        return self.sliding_window is not None and (self.sliding_layers is None or index in self.sliding_layers)

    def is_moe_layer(self, stack: str, index: int) -> bool:
        return self.moe is not None and (self.moe.layers is None or f"{stack}.{index}" in self.moe.layers)

    # -- (de)serialisation --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"config has unknown fields: {', '.join(unknown)}")
        check_field_types(cls, data, "config")
        if isinstance(data.get("moe"), dict):
            check_field_types(MoEConfig, data["moe"], "config moe")
        try:
            return cls(**data)
        except TypeError as exc:  # a required field is missing
            raise UserError(f"invalid config: {exc}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def replace(self, **changes: Any) -> "ModelConfig":
        return ModelConfig.from_dict({**self.to_dict(), **changes})

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        if name not in PRESETS:
            raise UserError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
        return cls.from_dict({**PRESETS[name], **overrides})


# CPM-2 (arXiv 2106.10715): T5-style encoder-decoder with gated tanh-GELU FFNs.
_CPM2 = dict(
    arch="encoder-decoder", vocab_size=26240, d_model=4096, n_heads=64, d_head=64, d_ff=10240,
    n_layers=24, n_decoder_layers=24, norm="rms", norm_position="pre", norm_eps=1e-6,
    position="relative", relative_buckets=32, relative_max_distance=128, max_positions=512,
    activation="gelu_tanh", gated=True, bias=False, attn_scale=False, tie_embeddings=False,
    pad_token_id=0, eos_token_id=1, init_std=0.001,
)

PRESETS: dict[str, dict[str, Any]] = {
    "cpm2-11b": _CPM2,
    # CPM-2's MoE stage: every FFN upcycled into 32 copies of the dense FFN, top-1 routing.
    "cpm2-moe-198b": {**_CPM2, "moe": dict(experts=32, expert_size=10240, top_k=1, router="linear")},
    # Not a released model: CPM-2 at half width (~2.8B), the teacher shape of recipes/cpm2-11b-ki.toml.
    "cpm2-2.8b": dict(_CPM2, d_model=2048, n_heads=32, d_ff=5120),
    # Llama-2-7B's shape, what `cpmctl convert hf` makes of meta-llama/Llama-2-7b-hf
    # (recipes/moefy-llama2-7b.toml).
    "llama2-7b": dict(
        arch="decoder", vocab_size=32000, d_model=4096, n_heads=32, n_kv_heads=32, d_ff=11008, n_layers=32,
        norm="rms", norm_eps=1e-5, position="rotary", max_positions=4096, activation="silu",
        gated=True, bias=False, tie_embeddings=False, eos_token_id=2, bos_token_id=1, pad_token_id=0,
    ),
    # Small models for tests and the demo: same families, a few hundred thousand parameters.
    "t5-tiny": dict(
        arch="encoder-decoder", vocab_size=512, d_model=64, n_heads=4, d_ff=128, n_layers=2,
        n_decoder_layers=2, norm="rms", position="relative", activation="gelu_tanh", gated=True,
        attn_scale=False, relative_buckets=8, relative_max_distance=32, max_positions=256,
    ),
    "cpm2-small": dict(
        _CPM2, vocab_size=8000, d_model=256, n_heads=4, d_head=64, d_ff=640, n_layers=4,
        n_decoder_layers=4, init_std=0.02,
    ),
    "bert-tiny": dict(
        arch="encoder", vocab_size=512, d_model=64, n_heads=4, d_ff=128, n_layers=2, norm="layer",
        norm_position="post", norm_eps=1e-12, position="absolute", max_positions=256,
        activation="gelu", gated=False, bias=True, type_vocab_size=2, tie_embeddings=True,
        lm_head_transform=True, lm_head_bias=True, eos_token_id=None,
    ),
    "llama-tiny": dict(
        arch="decoder", vocab_size=512, d_model=64, n_heads=4, n_kv_heads=2, d_ff=160, n_layers=2,
        norm="rms", norm_eps=1e-5, position="rotary", max_positions=512, activation="silu",
        gated=True, bias=False, tie_embeddings=False, eos_token_id=1, bos_token_id=2,
    ),
    # ~100M-parameter decoder used by the forward benchmark.
    "llama-100m": dict(
        arch="decoder", vocab_size=32000, d_model=768, n_heads=12, d_ff=2048, n_layers=12,
        norm="rms", norm_eps=1e-5, position="rotary", max_positions=2048, activation="silu",
        gated=True, bias=False, tie_embeddings=True, eos_token_id=2, bos_token_id=1,
    ),
}
