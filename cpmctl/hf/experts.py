"""Mixture-of-experts layers of the Hugging Face decoder families (Mixtral, Qwen2-MoE, Qwen3-MoE,
OLMoE, DeepSeek-V3): which layers are MoE, the router's settings, and the expert tensors in both
layouts a checkpoint may use.

Published checkpoints store one tensor per expert and projection,
    {block}.experts.{e}.{gate,up,down}   ([d_e, d], [d_e, d], [d, d_e])
(Mixtral: block_sparse_moe and w1 / w3 / w2), while transformers 5 (save_original_format=False)
writes them fused per layer under `mlp`:
    mlp.experts.gate_up_proj [E, 2 d_e, d]   (gate rows first, then up)
    mlp.experts.down_proj    [E, d, d_e]
Import reads either (each rule's `alternatives`); export writes the published per-expert layout,
which transformers converts on load. Ours is w_in / w_gate / w_out [E, d_e, d] (cpmctl.moe).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cpmctl.config import ModelConfig
from cpmctl.errors import UserError
from cpmctl.hf.family import Rule, integer, linear

EXPERT_INDEX = re.compile(r"layers\.(\d+)\.[\w.]*?experts\.(\d+)\.")


@dataclass(frozen=True)
class MoESpec:
    """How one family lays out and configures its MoE layers.

    `block`: the module name of a MoE FFN in published checkpoints (Mixtral: block_sparse_moe);
    `projections`: the per-expert names of gate, up and down; `shared` / `shared_gate`: the
    shared expert's module and its sigmoid gate (None: the family has none); `score_bias`: the
    router's selection bias under `{block}.gate.` (DeepSeek-V3). `read(hf, n_layers)` gives the
    ModelConfig fields (`moe` and `d_ff` of the dense layers), `write(config)` the config.json keys."""

    read: Callable[[Mapping[str, Any], int], dict[str, Any]]
    write: Callable[[ModelConfig], dict[str, Any]]
    block: str = "mlp"
    projections: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    shared: str | None = None
    shared_gate: str | None = None
    score_bias: str | None = None


def expert_rules(spec: MoESpec, c: ModelConfig, ours: str, layer: str) -> list[Rule]:
    """Rules for one MoE FFN: `ours` = "decoder.blocks.{i}.ffn", `layer` = "{prefix}layers.{i}"."""
    e_count = c.moe.experts
    hf, fused = f"{layer}.{spec.block}", f"{layer}.mlp"
    gate, up, down = spec.projections

    def per_expert(name: str) -> tuple[str, ...]:
        return tuple(f"{hf}.experts.{e}.{name}.weight" for e in range(e_count))

    def router(name: str) -> Rule:
        rule = Rule(f"{ours}.{name}", (f"{hf}.gate.{'weight' if name == 'router.weight' else spec.score_bias}",))
        if spec.block == "mlp":
            return rule
        return Rule(rule.ours, rule.hf, alternatives=(Rule(rule.ours, (rule.hf[0].replace(hf, fused, 1),)),))

    out = [
        router("router.weight"),
        Rule(f"{ours}.w_gate", per_expert(gate), "stack", alternatives=(Rule(f"{ours}.w_gate", (f"{fused}.experts.gate_up_proj",), "split1", 0, 2),)),
        Rule(f"{ours}.w_in", per_expert(up), "stack", alternatives=(Rule(f"{ours}.w_in", (f"{fused}.experts.gate_up_proj",), "split1", 1, 2),)),
        Rule(f"{ours}.w_out", per_expert(down), "stack_t", alternatives=(Rule(f"{ours}.w_out", (f"{fused}.experts.down_proj",), "t12"),)),
    ]
    if c.moe.score_bias:
        out.append(router("score_bias"))
    if c.moe.shared_size:
        for mine, theirs in (("w_gate", gate), ("w_in", up), ("w_out", down)):
            out += linear(f"{ours}.shared.{mine}", f"{hf}.{spec.shared}.{theirs}", False)
        if c.moe.shared_gate:
            out += linear(f"{ours}.shared_gate", f"{hf}.{spec.shared_gate}", False)
    return out


def check_expert_counts(config: ModelConfig, names, source: str) -> None:
    """UserError when per-expert tensors name more experts than config.json gives a layer."""
    if config.moe is None:
        return
    most: dict[int, int] = {}
    for name in names:
        m = EXPERT_INDEX.search(name)
        if m:
            layer, expert = int(m.group(1)), int(m.group(2))
            most[layer] = max(most.get(layer, 0), expert + 1)
    for layer, count in sorted(most.items()):
        if count > config.moe.experts:
            raise UserError(f"{source} holds {count} experts in layer {layer}, but config.json says {config.moe.experts}; "
                            "the checkpoint and its config disagree")


def moe_layers(n_layers: int, sparse: list[int]) -> list[str] | None:
    """MoEConfig.layers for the decoder layers in `sparse` (None: every layer)."""
    return None if sparse == list(range(n_layers)) else [f"decoder.{i}" for i in sparse]


def sparse_layers(c: ModelConfig) -> list[int]:
    return [i for i in range(c.n_layers) if c.is_moe_layer("decoder", i)]


def top_k(hf: Mapping[str, Any], experts: int, key: str, family: str, default: int) -> int:
    k = integer(hf, "num_experts_per_tok", default)
    if not 1 <= k <= experts:
        raise UserError(f"{family} config.json asks num_experts_per_tok={k} of {experts} experts ({key}); "
                        f"it must be in 1..{experts}")
    return k


def expert_count(hf: Mapping[str, Any], keys: tuple[str, ...], family: str, default: int) -> tuple[int, str]:
    """The number of routed experts and the config.json key it was read from."""
    for key in keys:
        if hf.get(key) is not None:
            value = integer(hf, key)
            if value < 1:
                raise UserError(f"{family} config.json field {key} must be >= 1, got {value}")
            return value, key
    return default, keys[0]


def refuse_moe_features(hf: Mapping[str, Any], family: str, features: Mapping[str, Callable[[Any], bool]]) -> None:
    """Router features a family's config may name that cpmctl does not implement, by name."""
    for key, bad in features.items():
        if key in hf and bad(hf[key]):
            raise UserError(f"unsupported {family} router feature {key}={hf[key]!r}")
