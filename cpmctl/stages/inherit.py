"""cpmctl inherit SRC --to PRESET_OR_CONFIG OUT [--method fpi|aki|tile|stack] [--vocab TOKENIZER] [--to-moe E] [--verify]

Grows checkpoint SRC into a wider and/or deeper model (cpmctl.growth explains the methods),
optionally expands its vocabulary to a new tokenizer (new tokens start from the embedding of
their longest prefix in the old vocabulary, else a random one; old tokens keep theirs) and
upcycles every FFN into E experts (each a copy of the FFN, top-1, orthogonal router with gain
0.01). `--to` is a preset name, a config.json (or a checkpoint directory holding one), or
KEY=VALUE pairs applied to SRC's config ("d_model=512,n_heads=8,d_ff=1024,n_layers=8"). Only the
shape fields (d_model, heads, d_head, d_ff, layers) come from the target; everything else stays
as in SRC. `--verify` runs both models on sample text and reports the largest logit difference.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cpmctl import growth
from cpmctl.checkpoint import check_state_dict_matches, load_model, save_checkpoint
from cpmctl.command_configs import InheritConfig  # the options, declared once
from cpmctl.errors import UserError
from cpmctl.model import build_model
from cpmctl.plan import (checkpoint_config, dtype_bytes, is_assumed, make_plan, meta_model, parameter_count,
                         source_note, stored_dtype)
from cpmctl.tokenizer import load_tokenizer

log = logging.getLogger("cpmctl")

SAMPLE_TEXT = ("Knowledge inheritance grows a small trained model into a larger one, "
               "so the larger one starts from what the small one already knows.")


def _sample_inputs(config, tok, seed: int) -> dict[str, torch.Tensor]:
    if tok is not None:
        ids = torch.tensor([tok.encode(SAMPLE_TEXT)[:64]])
    else:
        ids = torch.randint(3, config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(seed))
    inputs = {"input_ids": ids}
    if config.arch == "encoder-decoder":
        inputs["decoder_input_ids"] = torch.cat([torch.full((1, 1), config.start_token_id), ids[:, :-1]], dim=1)
    return inputs


def _check_options(cfg: InheritConfig) -> None:
    if cfg.method not in growth.METHODS:
        raise UserError(f"unknown method {cfg.method!r}; expected one of {', '.join(growth.METHODS)}")
    if Path(cfg.out).exists() and not cfg.force:
        raise UserError(f"output {cfg.out} already exists; choose a new path or pass --force")
    if cfg.to_moe is not None and cfg.to_moe < 1:
        raise UserError(f"--to-moe needs at least 1 expert, got {cfg.to_moe}")


def vocab_dir(cfg: InheritConfig) -> Path:
    """--vocab: a tokenizer directory, or a checkpoint holding one."""
    return Path(cfg.vocab) / "tokenizer" if (Path(cfg.vocab) / "tokenizer").is_dir() else Path(cfg.vocab)


def grown_config(cfg: InheritConfig, src_config):
    """SRC's config with the --to target's widths and depths (before --vocab and --to-moe)."""
    new_config, kept = growth.grown_config(src_config, growth.target_config(cfg.to, src_config))
    if kept:
        log.info(f"kept from the source (the target differs): {', '.join(kept)}")
    return new_config


def output_config(cfg: InheritConfig, src_config, vocab_size: int | None):
    """The config the run writes: grown, with the new vocabulary (`vocab_size`, None: unchanged)
    and upcycled to --to-moe experts (growth.upcycle_moe's config, given no tensors)."""
    config = grown_config(cfg, src_config)
    if vocab_size is not None:
        config = config.replace(vocab_size=vocab_size)
    if cfg.to_moe is not None:
        _, config = growth.upcycle_moe({}, config, cfg.to_moe, torch.Generator())
    return config


def plan(cfg: InheritConfig, *, stand_ins=None):
    """What `run(cfg)` would write, from SRC's config alone (nothing loaded or written)."""
    _check_options(cfg)
    src_config = checkpoint_config(cfg.src, stand_ins)
    notes: list[str | None] = [source_note(cfg.src, "source", stand_ins)]
    vocab_size = None
    if cfg.vocab is not None:
        if not is_assumed(cfg.src, stand_ins) and not (Path(cfg.src) / "tokenizer").is_dir():
            raise UserError(f"--vocab needs the source's tokenizer, and {cfg.src} has no tokenizer/ directory")
        if vocab_dir(cfg).is_dir():
            vocab_size = load_tokenizer(vocab_dir(cfg)).vocab_size
        else:
            notes.append(f"--vocab {cfg.vocab}: not there yet (vocabulary size unknown: kept at {src_config.vocab_size})")
    config = output_config(cfg, src_config, vocab_size)
    dtype = stored_dtype(cfg.src)
    if dtype is None:
        notes.append("stored dtype unknown: float32 assumed")
    itemsize = dtype_bytes(dtype)
    src_params = parameter_count(meta_model(src_config))
    out_params = parameter_count(meta_model(config))
    return make_plan("inherit", output=Path(cfg.out), output_config=config, parameters=out_params, trainable=0,
                     parameter_bytes=out_params * itemsize, devices=1,
                     breakdown={"source weights": src_params * itemsize, "output weights": out_params * itemsize},
                     steps=None, tokens=None, notes=notes,
                     details={"method": cfg.method, "parameters": f"{src_params:,} -> {out_params:,}", "dtype": dtype or "float32"})


def run(cfg: InheritConfig) -> dict[str, Any]:
    _check_options(cfg)
    if not Path(cfg.src).is_dir():
        raise UserError(f"source {cfg.src} is not a checkpoint directory")
    src_model, ckpt = load_model(cfg.src)
    ckpt.close()
    src_config = src_model.config
    tok_dir = Path(cfg.src) / "tokenizer"
    old_tok = load_tokenizer(tok_dir) if tok_dir.is_dir() else None
    new_tok, new_tok_dir = None, None
    if cfg.vocab is not None:
        new_tok_dir = vocab_dir(cfg)
        if not new_tok_dir.is_dir():
            raise UserError(f"--vocab {cfg.vocab} is not a tokenizer directory")
        if old_tok is None:
            raise UserError(f"--vocab needs the source's tokenizer, and {cfg.src} has no tokenizer/ directory")
        new_tok = load_tokenizer(new_tok_dir)

    new_config = grown_config(cfg, src_config)
    state = growth.grow_state(src_model.state_dict(), src_config, new_config, cfg.method, cfg.seed)
    stats: dict[str, Any] = {}
    generator = torch.Generator().manual_seed(cfg.seed)
    if new_tok is not None:
        source_ids, stats = growth.vocab_source_ids(old_tok, new_tok, np.random.default_rng(cfg.seed))
        state = growth.remap_vocab(state, source_ids)
        new_config = new_config.replace(vocab_size=new_tok.vocab_size)
    if cfg.to_moe is not None:
        state, new_config = growth.upcycle_moe(state, new_config, cfg.to_moe, generator)

    model = build_model(new_config, device="meta")
    check_state_dict_matches({k: tuple(v.shape) for k, v in model.state_dict().items()}, {k: tuple(v.shape) for k, v in state.items()})
    model.load_state_dict(state, assign=True, strict=True)
    model.eval()

    result: dict[str, Any] = {
        "out": str(cfg.out), "method": cfg.method, "parameters_src": sum(p.numel() for p in src_model.parameters()),
        "parameters_out": sum(p.numel() for p in model.parameters()),
        "shape_src": {f: getattr(src_config, f) for f in growth.GROWTH_FIELDS},
        "shape_out": {f: getattr(new_config, f) for f in growth.GROWTH_FIELDS},
        "vocab": stats or None, "experts": cfg.to_moe,
    }
    if cfg.verify:
        if new_tok is not None:
            result["max_logit_diff"] = None
            result["verify"] = "skipped: the vocabulary changed, so the same text has other ids"
        else:
            inputs = _sample_inputs(src_config, old_tok, cfg.seed)
            with torch.no_grad():
                a, b = src_model.float()(**inputs), model.float()(**inputs)
            result["max_logit_diff"] = growth.logit_difference(a, b)
            result["max_logit"] = float(a.abs().max())
            result["exact_expected"] = growth.is_exact(cfg.method, src_config)
    save_checkpoint(cfg.out, new_config, model.state_dict(), tokenizer_dir=new_tok_dir or (tok_dir if tok_dir.is_dir() else None),
                    stage="inherit", parents=[cfg.src], options={"method": cfg.method, "to": cfg.to, "vocab": str(cfg.vocab) if cfg.vocab else None,
                                                                "to_moe": cfg.to_moe, "seed": cfg.seed},
                    metrics={k: result[k] for k in ("max_logit_diff",) if result.get(k) is not None}, overwrite=cfg.force)
    return result
