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

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cpmctl.errors import UserError

log = logging.getLogger("cpmctl")

SAMPLE_TEXT = ("Knowledge inheritance grows a small trained model into a larger one, "
               "so the larger one starts from what the small one already knows.")


@dataclass
class InheritConfig:
    src: Path
    to: str
    out: Path
    method: str = "fpi"
    vocab: Path | None = None      # a new tokenizer (directory, file, or a checkpoint holding one)
    to_moe: int | None = None      # experts per FFN
    verify: bool = False
    seed: int = 0
    force: bool = False


def target_config(spec: str, src_config):
    """--to: preset name, config.json / checkpoint directory, or KEY=VALUE pairs."""
    from cpmctl.config import PRESETS, ModelConfig

    if spec in PRESETS:
        return ModelConfig.from_preset(spec)
    path = Path(spec)
    if path.is_dir() and (path / "config.json").is_file():
        path = path / "config.json"
    if path.is_file():
        try:
            return ModelConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except json.JSONDecodeError as exc:
            raise UserError(f"{path} is not valid JSON: {exc}") from None
    if "=" in spec:
        changes: dict[str, Any] = {}
        for part in spec.split(","):
            key, _, value = part.partition("=")
            try:
                changes[key.strip()] = int(value)
            except ValueError:
                raise UserError(f"--to {spec!r}: {part!r} is not KEY=INTEGER") from None
        if "n_heads" in changes and "n_kv_heads" not in changes:  # keep the grouping of query heads
            changes["n_kv_heads"] = max(changes["n_heads"] * src_config.n_kv_heads // src_config.n_heads, 1)
        return src_config.replace(**changes)
    raise UserError(f"--to {spec!r} is neither a preset ({', '.join(sorted(PRESETS))}), a config file, nor KEY=VALUE pairs")


def _sample_inputs(config, tok, seed: int) -> dict[str, torch.Tensor]:
    if tok is not None:
        ids = torch.tensor([tok.encode(SAMPLE_TEXT)[:64]])
    else:
        ids = torch.randint(3, config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(seed))
    inputs = {"input_ids": ids}
    if config.arch == "encoder-decoder":
        inputs["decoder_input_ids"] = torch.cat([torch.full((1, 1), config.start_token_id), ids[:, :-1]], dim=1)
    return inputs


def run(cfg: InheritConfig) -> dict[str, Any]:
    from cpmctl import growth
    from cpmctl.checkpoint import load_model, save_checkpoint
    from cpmctl.model import build_model
    from cpmctl.tokenizer import load_tokenizer

    if cfg.method not in growth.METHODS:
        raise UserError(f"unknown method {cfg.method!r}; expected one of {', '.join(growth.METHODS)}")
    if Path(cfg.out).exists() and not cfg.force:
        raise UserError(f"output {cfg.out} already exists; choose a new path or pass --force")
    if not Path(cfg.src).is_dir():
        raise UserError(f"source {cfg.src} is not a checkpoint directory")
    src_model, ckpt = load_model(cfg.src)
    ckpt.close()
    src_config = src_model.config
    tok_dir = Path(cfg.src) / "tokenizer"
    old_tok = load_tokenizer(tok_dir) if tok_dir.is_dir() else None
    new_tok, new_tok_dir = None, None
    if cfg.vocab is not None:
        new_tok_dir = Path(cfg.vocab) / "tokenizer" if (Path(cfg.vocab) / "tokenizer").is_dir() else Path(cfg.vocab)
        if not new_tok_dir.is_dir():
            raise UserError(f"--vocab {cfg.vocab} is not a tokenizer directory")
        if old_tok is None:
            raise UserError(f"--vocab needs the source's tokenizer, and {cfg.src} has no tokenizer/ directory")
        new_tok = load_tokenizer(new_tok_dir)
    if cfg.to_moe is not None and cfg.to_moe < 1:
        raise UserError(f"--to-moe needs at least 1 expert, got {cfg.to_moe}")

    target = target_config(cfg.to, src_config)
    new_config, kept = growth.grown_config(src_config, target)
    if kept:
        log.info(f"kept from the source (the target differs): {', '.join(kept)}")
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
    from cpmctl.checkpoint import check_state_dict_matches

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
