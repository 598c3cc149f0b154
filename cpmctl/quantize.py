"""`cpmctl quantize`: a checkpoint with its routed experts, or its dense linear layers (attention and
FFN), stored weight-only int8 or int4; and the same quantization of a loaded model in memory
(`quantize_linears`, behind `cpmctl infer --dtype int8|int4`).

The quantizer is torchao's (`choose_qparams_affine` / `quantize_affine`): int8 symmetric with
one scale per output row, int4 asymmetric with an integer zero point per group of inputs,
rewritten into the stored form (cpmctl.quant: W = (q - 8) * scale + zero). Scales are rounded to
bf16 before the values are quantized against them, so the stored scales are the ones the values
were chosen for. Every other weight is copied as it is. The result is an ordinary checkpoint
(checksums recorded, written atomically) whose config says what was quantized.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
from torch import Tensor

from cpmctl.checkpoint import LazyTensor, open_checkpoint, save_checkpoint_with
from cpmctl.config import QuantConfig
from cpmctl.cpu_int4 import write_cpu_int4_layout
from cpmctl.errors import UserError
from cpmctl.model import build_model
from cpmctl.quant import (INT4_OFFSET, SCALE_DTYPE, QuantizedLinear, check_scheme, output_projection, pack_int4,
                          quantizable_linears, swap_in)

EXPERT_WEIGHTS = ("w_in", "w_gate", "w_out")


@contextlib.contextmanager
def _quiet_import():
    """torchao logs a warning per optional CUDA extension it cannot load on a CPU machine; a
    command's output is one line, so those loggers are raised to ERROR while it imports."""
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _primitives():
    try:
        with _quiet_import():
            from torchao.quantization import quant_primitives  # optional dependency (torchao), imported by quantize only
    except ImportError:
        raise UserError("quantizing needs torchao's quantizer: pip install 'cpmctl[quant]' (torchao)") from None
    return quant_primitives


def quantize_rows(w: Tensor, scheme: str, group_size: int | None) -> dict[str, Tensor]:
    """W [rows, in] (float) -> {"qweight", "scales"[, "zeros"]} in the stored form."""
    qp = _primitives()
    w = w.float()
    rows, width = w.shape
    if scheme == "int8":
        block = (1, width)
        scale, zero_point = qp.choose_qparams_affine(w, qp.MappingType.SYMMETRIC, block, torch.int8, -127, 127,
                                                     eps=torch.finfo(torch.float32).eps, scale_dtype=torch.float32)
        scale = scale.reshape(rows, 1).to(SCALE_DTYPE)
        q = qp.quantize_affine(w, block, scale.float().view(-1), zero_point.view(-1), torch.int8, -127, 127)
        return {"qweight": q.to(torch.int8), "scales": scale}
    block = (1, group_size)
    scale, zero_point = qp.choose_qparams_affine(w, qp.MappingType.ASYMMETRIC, block, torch.uint8, 0, 15,
                                                 eps=torch.finfo(torch.float32).eps, scale_dtype=torch.float32,
                                                 zero_point_dtype=torch.int32)
    groups = width // group_size
    scale = scale.reshape(rows, groups).to(SCALE_DTYPE)
    zero_point = zero_point.reshape(rows, groups)
    q = qp.quantize_affine(w, block, scale.float().view(-1), zero_point.view(-1), torch.uint8, 0, 15)
    # (q - zp) * s == (q - 8) * s + (8 - zp) * s: the zero in the form the fused kernels take
    zeros = ((INT4_OFFSET - zero_point).float() * scale.float()).to(SCALE_DTYPE)
    return {"qweight": pack_int4(q), "scales": scale, "zeros": zeros}


def quantize_stack(w: Tensor, scheme: str, group_size: int | None, *, transposed: bool) -> dict[str, Tensor]:
    """A stack [*lead, a, b] of linear weights ([*lead, in, out] when `transposed`)."""
    if transposed:
        w = w.transpose(-1, -2)
    lead, (out_f, in_f) = w.shape[:-2], w.shape[-2:]
    parts = quantize_rows(w.reshape(-1, in_f), scheme, group_size)
    return {k: v.reshape(*lead, out_f, v.shape[-1]).contiguous() for k, v in parts.items()}


def expert_tensors(config) -> dict[str, bool]:
    """Names of the routed experts' weights of a model with this config -> used transposed."""
    model = build_model(config, device="meta")
    names = {}
    for stack, i, ffn in model.ffn_modules():
        if not hasattr(ffn, "route"):
            continue
        for w in EXPERT_WEIGHTS:
            if getattr(ffn, w) is not None:
                names[f"{stack}.blocks.{i}.ffn.{w}"] = w == "w_out"
    return names


def linear_tensors(config, *, output: bool = True) -> dict[str, str]:
    """Stored weight name -> the name its quantized parts take (NAME.weight -> NAME), for the
    linear layers a "linear" quantization covers (cpmctl.quant.quantizable_linears; with `output`,
    the untied output projection too)."""
    model = build_model(config, device="meta")
    return {f"{name}.weight": name for name in quantizable_linears(model, output=output)}


def quantizes_output(scheme: str) -> bool:
    """Whether a "linear" quantization covers the untied output projection: int8 does, as llama.cpp's
    q8_0 files do (held-out perplexity -0.009% against fp32, and 18% fewer bytes per decoded token
    on the benchmark model: BENCHMARKS.md, issue 26). int4 does not: llama.cpp keeps its output in a
    6-bit format, and torch's int4 CPU kernel needs output widths divisible by 16 (vocabularies are not)."""
    return scheme == "int8"


def quantize_linears(model, scheme: str, group_size: int | None, *, output: bool | None = None) -> int:
    """Quantize the quantizable linear layers of a loaded float model in place (each becomes a
    QuantizedLinear holding what `cpmctl quantize --linear` would store), with the untied output
    projection where `output` (default: `quantizes_output(scheme)`); returns how many."""
    check_scheme(scheme, group_size)
    output = quantizes_output(scheme) if output is None else output
    targets = {name: m for name, m in quantizable_linears(model, output=output).items() if not isinstance(m, QuantizedLinear)}
    for name, linear in targets.items():
        check_scheme(scheme, group_size, linear.in_features)
    for name, linear in targets.items():
        module = QuantizedLinear.like(linear, scheme, group_size)
        parts = quantize_rows(linear.weight.detach(), scheme, group_size)
        state = {part: tensor.to(linear.weight.device) for part, tensor in parts.items()}
        if linear.bias is not None:
            state["bias"] = linear.bias.detach()
        module.load_state_dict(state, strict=True, assign=True)  # its post-hook prepares the CPU layout
        swap_in(model, name, module)
    model.config = model.config.replace(quantization={"scheme": scheme, "group_size": group_size, "weights": "linear",
                                                      "output": "lm_head.proj" in targets})
    return len(targets)


def quantize_output(model, scheme: str, group_size: int | None) -> bool:
    """Quantize the untied output projection (lm_head.proj) of a loaded model in place, alone (what
    `quantize_linears` does with the rest; for a model whose linear layers were quantized without
    it, as checkpoints before QuantConfig.output were); returns whether there was one to quantize."""
    linear = output_projection(model)
    if linear is None or isinstance(linear, QuantizedLinear):
        return False
    check_scheme(scheme, group_size, linear.in_features)
    module = QuantizedLinear.like(linear, scheme, group_size)
    parts = quantize_rows(linear.weight.detach(), scheme, group_size)
    module.load_state_dict({part: t.to(linear.weight.device) for part, t in parts.items()}, strict=True, assign=True)
    swap_in(model, "lm_head.proj", module)
    quant = model.config.quantization
    if quant is not None and quant.weights == "linear":
        model.config = model.config.replace(quantization={**quant.__dict__, "output": True})
    return True


def quantize_checkpoint(src, out, *, experts: str | None = None, linear: str | None = None, group_size: int | None = None,
                        overwrite: bool = False) -> dict:
    """Write `out`: `src` with its routed experts (`experts` int8 or int4) or its dense linear
    layers (`linear`) quantized. Returns a summary (bytes before and after, tensors quantized)."""
    if (experts is None) == (linear is None):
        raise UserError("quantize either the experts or the linear layers (one scheme for one of them)", option="experts")
    scheme = experts if experts is not None else linear
    spec = QuantConfig(scheme, group_size, "experts" if experts is not None else "linear")  # output: set below
    ckpt = open_checkpoint(src)
    try:
        config = ckpt.config
        if config.quantization is not None:
            q = config.quantization
            raise UserError(f"{src} is already quantized ({q.weights} {q.scheme}"
                            f"{'' if q.group_size is None else f', group size {q.group_size}'}); quantize its unquantized parent")
        if experts is not None:
            if config.moe is None:
                raise UserError(f"{src} has no experts to quantize (it is a dense model: quantize its linear layers)")
            transposed = expert_tensors(config)
            names = {name: name for name in transposed}
        else:
            names = linear_tensors(config, output=quantizes_output(scheme))
            spec.output = "lm_head.proj.weight" in names
            transposed = dict.fromkeys(names, False)
            if not names:
                raise UserError(f"{src} has no attention or dense FFN linear layers to quantize")
        shapes = ckpt.shapes()
        for name in names:
            check_scheme(scheme, group_size, shapes[name][-2 if transposed[name] else -1])
        state: dict[str, Tensor | LazyTensor] = {}
        cache: dict[str, dict[str, Tensor]] = {}

        def producer(name: str, part: str):
            def produce() -> Tensor:
                if name not in cache:
                    cache.clear()  # one source tensor's parts alive at a time
                    cache[name] = quantize_stack(ckpt.get(name), scheme, group_size, transposed=transposed[name])
                return cache[name][part]
            return produce

        before = after = 0
        for name in ckpt.tensor_names():
            info = ckpt.tensor_info(name)
            before += info.nbytes
            if name not in names:
                state[name] = LazyTensor(info.dtype, tuple(info.shape), lambda name=name: ckpt.get(name))
                after += info.nbytes
                continue
            *lead, a, b = info.shape
            out_f, in_f = (b, a) if transposed[name] else (a, b)
            groups = in_f // group_size if scheme == "int4" else 1
            layout = {"qweight": ((torch.uint8, in_f // 2) if scheme == "int4" else (torch.int8, in_f)),
                      "scales": (SCALE_DTYPE, groups)}
            if scheme == "int4":
                layout["zeros"] = (SCALE_DTYPE, groups)
            for part, (dtype, last) in layout.items():
                shape = (*lead, out_f, last)
                state[f"{names[name]}.{part}"] = LazyTensor(dtype, shape, producer(name, part))
                after += torch.Size(shape).numel() * dtype.itemsize
        new_config = config.replace(quantization=spec.__dict__)
        tokenizer = Path(src) / "tokenizer"

        def write_cpu_layout(directory: Path) -> None:
            # int4 experts: the qweights again in the CPU kernel's layout, so offloaded misses need no
            # repack (resident linear layers are repacked once at load)
            if experts == "int4":
                with open_checkpoint(directory) as written:
                    write_cpu_int4_layout(directory, written, [f"{name}.qweight" for name in names], group_size)

        save_checkpoint_with(out, write_cpu_layout, new_config, state, tokenizer_dir=tokenizer if tokenizer.is_dir() else None,
                             stage="quantize", parents=[src],
                             options={"experts": experts, "linear": linear, "group_size": group_size},
                             overwrite=overwrite, metrics={"weight_bytes_before": before, "weight_bytes_after": after})
    finally:
        ckpt.close()
    return {"out": str(out), "scheme": scheme, "weights": spec.weights, "group_size": group_size, "tensors_quantized": len(names),
            "weight_bytes_before": before, "weight_bytes_after": after, "ratio": round(after / before, 4)}
