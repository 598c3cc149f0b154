"""cpmctl quantize CKPT OUT --experts int8|int4 [--group-size N]: the experts stored weight-only
quantized (cpmctl.quantize), every other weight as it was."""

from __future__ import annotations

from cpmctl.command_configs import QuantizeConfig
from cpmctl.quantize import quantize_checkpoint

DEFAULT_INT4_GROUP = 64


def run(cfg: QuantizeConfig) -> dict:
    group_size = cfg.group_size
    if cfg.experts == "int4" and group_size is None:
        group_size = DEFAULT_INT4_GROUP
    return quantize_checkpoint(cfg.checkpoint, cfg.out, experts=cfg.experts, group_size=group_size, overwrite=cfg.force)
