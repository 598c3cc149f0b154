"""Step-robust training of parameter-shared models (the shared ODE view of a Transformer): the
iteration counts a run samples from, the count of each micro-batch, and what a step costs when a
shared block is applied several times."""

from __future__ import annotations

import random

from torch import nn

from cpmctl.model import applied_block_parameters, distinct_block_parameters
from cpmctl.training import model_flops_per_token


def default_robust_iterations(depth: int, groups: int) -> list[int]:
    """L, 3L/4 and L/2, each rounded (half up) to a multiple of G and at least G, distinct."""
    out: list[int] = []
    for fraction in (1.0, 0.75, 0.5):
        n = max(groups, groups * int(depth * fraction / groups + 0.5))
        if n not in out:
            out.append(n)
    return out


def sampled_iterations(choices: list[int], seed: int, step: int, micro: int) -> int:
    """The iteration count of one micro-batch: uniform over `choices`, a pure function of
    (seed, step, micro-batch index) so that --resume replays exactly the same schedule."""
    return choices[random.Random(f"step-robust:{seed}:{step}:{micro}").randrange(len(choices))]


def flops_per_token(model: nn.Module) -> float:
    """Training FLOPs per token (6 x multiplied parameters) with every block application counted:
    a shared block applied L times costs L times its parameters."""
    return model_flops_per_token(model) + 6.0 * (applied_block_parameters(model) - distinct_block_parameters(model))
