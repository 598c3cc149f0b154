"""cpmctl quantize CKPT OUT --experts int8|int4 | --linear int8|int4 [--group-size N]: the routed
experts, or the dense linear layers of attention and FFN, stored weight-only quantized
(cpmctl.quantize), every other weight as it was."""

from __future__ import annotations

from cpmctl.command_configs import QuantizeConfig
from cpmctl.config import DEFAULT_INT4_GROUP
from cpmctl.quantize import quantize_checkpoint


def run(cfg: QuantizeConfig) -> dict:
    cfg.validate()
    scheme = cfg.experts if cfg.experts is not None else cfg.linear
    group_size = cfg.group_size
    if scheme == "int4" and group_size is None:
        group_size = DEFAULT_INT4_GROUP
    return quantize_checkpoint(cfg.checkpoint, cfg.out, experts=cfg.experts, linear=cfg.linear, group_size=group_size,
                               overwrite=cfg.force)
