"""Recording a model's routing: which experts each MoE layer call needs, and what pre-gating
(the next layer's router applied to this layer's input) would have guessed for it.

The trace feeds `cpmctl.offload.policy` (Belady's MIN and the other policies, prefetch precision
and recall). Recording uses forward pre-hooks that call the layer's own `route`, so it works on
the resident model and costs one extra router evaluation per layer, nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


@dataclass
class RoutingTrace:
    calls: list[list[tuple]] = field(default_factory=list)  # experts needed, per layer call, as (stack, layer, expert)
    guesses: list[list[tuple] | None] = field(default_factory=list)  # pre-gated guess for each call (None: first layer)
    tokens: list[int] = field(default_factory=list)  # tokens routed in each call

    def steps(self, layers: int) -> list[list[list[tuple]]]:
        """The calls cut into forward passes of `layers` MoE layer calls each."""
        return [self.calls[i : i + layers] for i in range(0, len(self.calls) - layers + 1, layers)]


def routed_layers(model: nn.Module) -> list[tuple[str, int, nn.Module]]:
    """The MoE layers that route (the ones an offloaded model streams), in execution order."""
    return [(stack, i, ffn) for stack, i, ffn in model.ffn_modules() if hasattr(ffn, "route") and not ffn.selects_all]


def _experts(ffn: nn.Module, x: Tensor) -> list[int]:
    experts, _ = ffn.route(x.reshape(-1, x.shape[-1]))
    return sorted(set(experts.flatten().tolist()))


def record_routing(model: nn.Module) -> tuple[RoutingTrace, list]:
    """Hooks that append to a new trace on every forward of the model's routed layers; returns
    (trace, handles) - remove the handles when done."""
    trace = RoutingTrace()
    layers = routed_layers(model)
    next_of = {id(ffn): layers[j + 1] if j + 1 < len(layers) and layers[j + 1][0] == stack else None
               for j, (stack, i, ffn) in enumerate(layers)}
    pending: dict[tuple, list[tuple]] = {}  # guesses waiting for the call they are for

    def hook_for(stack: str, index: int, ffn: nn.Module):
        @torch.no_grad()
        def hook(module, args):
            x = args[0]
            needed = [(stack, index, e) for e in _experts(ffn, x)]
            trace.calls.append(needed)
            trace.tokens.append(x.reshape(-1, x.shape[-1]).shape[0])
            trace.guesses.append(pending.pop((stack, index), None))
            nxt = next_of[id(ffn)]
            if nxt is not None:
                n_stack, n_index, n_ffn = nxt
                pending[(n_stack, n_index)] = [(n_stack, n_index, e) for e in _experts(n_ffn, x)]
        return hook

    handles = [ffn.register_forward_pre_hook(hook_for(stack, i, ffn)) for stack, i, ffn in layers]
    return trace, handles
