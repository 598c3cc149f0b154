"""Weight-only quantized linear weights: the stored format and the dequantize-in-matmul.

Any linear weight W [*lead, out, in] (y = x W^T; `lead` stacks experts) is stored as tensors
beside each other, named after the weight:
    NAME.qweight  int8  [*lead, out, in]        (int8: one scale per output row, symmetric)
                  uint8 [*lead, out, in / 2]    (int4: two values per byte, element 2j in the low
                                                 nibble, 2j + 1 in the high one)
    NAME.scales   bf16  [*lead, out, groups]    (int8: groups = 1; int4: in / group_size)
    NAME.zeros    bf16  [*lead, out, groups]    (int4 only)
and dequantizes as
    int8: W = q * scale
    int4: W = (q - 8) * scale + zero            (asymmetric, the "tinygemm" form)
Every leading index (an expert) is a contiguous block of each tensor, so an expert is still one
row gather per tensor and streams like an unquantized one. A weight used transposed (the MoE
layout's w_out, stored [E, d_e, d] = [*lead, in, out]) is quantized as its linear form
[E, d, d_e], groups along d_e.

The matmul (`quantized_linear`): on a CPU torch's fused weight-only kernels,
`torch._weight_int8pack_mm` and `torch._weight_int4pack_mm_for_cpu`, in bf16 activations
(measured on this project's CPU, benchmarks/quant_matmul.py: with fp32 activations both
kernels ran slower than the fp32 dense matmul, in bf16 faster); int4 needs its weight repacked
into the kernel's layout (`cpu_int4_pack`, done once per resident weight). Elsewhere the weight is
dequantized and multiplied (`dequantize`), the reference every kernel is tested against. A dense
int8 `QuantizedLinear` on a CPU with decode-sized inputs (at most CPU_GEMV_MAX_ROWS rows) runs
instead cpmctl's C++ GEMV (cpmctl_cpu.gemv: the stored tensors read as they are, fp32 activations
and accumulation, AVX-512, software prefetch), which streams the weight 1.2-2x faster than torch's
kernel at one row (benchmarks/cpu_gemv.py; int4 keeps torch's, which measured faster than the C++
int4 GEMV); a machine that cannot build it keeps torch's kernels (`cpu_gemv_problem` says why). With
`--kernels triton` a CUDA MoE layer instead hands these tensors, as stored, to the int8/int4
variants of the Triton MoE kernels (cpmctl_kernels.quant), which dequantize tiles in registers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cpmctl.config import QUANT_GROUP_SIZES, QuantConfig
from cpmctl.errors import UserError
from cpmctl.ffn import FeedForward

SCALE_DTYPE = torch.bfloat16
INT4_OFFSET = 8
# The tensors a quantized weight NAME is stored as: NAME.qweight, NAME.scales (, NAME.zeros).
QUANT_PARTS = ("qweight", "scales", "zeros")


def is_quantized_part(name: str) -> bool:
    """Whether a stored tensor is a piece of a quantized weight (kept in its stored dtype when run)."""
    return name.rpartition(".")[2] in QUANT_PARTS


@dataclass(frozen=True)
class QuantizedView:
    """One quantized linear weight [out, in] (or a stack [*lead, out, in]): views of its tensors."""

    scheme: str
    group_size: int | None
    qweight: Tensor
    scales: Tensor
    zeros: Tensor | None
    cpu_packed: Tensor | None = None  # int4 in the CPU kernel's layout, when prepared
    cpu_scales_zeros: Tensor | None = None  # int4: scales and zeros as the CPU kernel reads them [groups, out, 2]

    @property
    def out_features(self) -> int:
        return self.qweight.shape[-2]

    @property
    def in_features(self) -> int:
        return self.qweight.shape[-1] * (2 if self.scheme == "int4" else 1)

    def __getitem__(self, index) -> "QuantizedView":
        return QuantizedView(self.scheme, self.group_size, self.qweight[index], self.scales[index],
                             None if self.zeros is None else self.zeros[index],
                             None if self.cpu_packed is None else self.cpu_packed[index])


def check_scheme(scheme: str, group_size: int | None, in_features: int | None = None) -> None:
    """UserError for a scheme, group size or width the format and its kernels do not take."""
    QuantConfig(scheme, group_size)  # validates scheme and group size
    if in_features is not None and scheme == "int4" and in_features % group_size:
        raise UserError(f"int4 with group size {group_size} needs input widths divisible by it; a weight has {in_features}",
                        option="group_size")


def unpack_int4(packed: Tensor) -> Tensor:
    """uint8 [..., n / 2] -> uint8 [..., n] of values 0..15 (low nibble first)."""
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)


def pack_int4(values: Tensor) -> Tensor:
    """uint8 [..., n] of values 0..15 -> uint8 [..., n / 2] (element 2j low, 2j + 1 high)."""
    v = values.to(torch.uint8)
    return v[..., 0::2] | (v[..., 1::2] << 4)


def dequantize(w: QuantizedView, dtype: torch.dtype = torch.float32) -> Tensor:
    """The weight [*lead, out, in] in `dtype`: the format's definition, computed in fp32."""
    if w.scheme == "int8":
        return (w.qweight.float() * w.scales.float()).to(dtype)
    q = unpack_int4(w.qweight).float() - INT4_OFFSET
    shape = q.shape
    grouped = q.view(*shape[:-1], -1, w.group_size)
    out = grouped * w.scales.float()[..., None] + w.zeros.float()[..., None]
    return out.view(shape).to(dtype)


def cpu_int4_pack(w: QuantizedView) -> Tensor:
    """The int4 values of one weight [out, in] in the layout `torch._weight_int4pack_mm_for_cpu` reads."""
    return torch._convert_weight_to_int4pack_for_cpu(unpack_int4(w.qweight).to(torch.int32), 1)


def cpu_int4_scales_zeros(w: QuantizedView) -> Tensor:
    """Scales and zeros of one int4 weight [out, in] as the CPU kernel reads them: [groups, out, 2]."""
    return torch.stack((w.scales, w.zeros), dim=-1).transpose(0, 1).contiguous()


# torch._weight_int8pack_mm reads its weight with aligned vector loads: a weight that does not
# start on a 64-byte boundary (a memory-mapped safetensors view usually does not) crashed the
# process (SIGSEGV) from 8 rows up (torch 2.13, AVX-512). Weights are copied to aligned memory first.
CPU_ALIGNMENT = 64


def cpu_aligned(t: Tensor) -> Tensor:
    """`t`, or an aligned contiguous copy when it does not start on a CPU_ALIGNMENT boundary."""
    if t.device.type != "cpu" or (t.is_contiguous() and t.data_ptr() % CPU_ALIGNMENT == 0):
        return t
    return t.contiguous() if not t.is_contiguous() else t.clone()


def cpu_kernels_available(scheme: str) -> bool:
    name = "_weight_int8pack_mm" if scheme == "int8" else "_weight_int4pack_mm_for_cpu"
    return hasattr(torch.ops.aten, name)


# -- cpmctl's C++ GEMV (decode-sized inputs on a CPU) ---------------------------------------------------
# The most activation rows a layer hands to the C++ GEMV; more rows (prefill) take torch's kernels,
# which pack and block for GEMM. Measured in benchmarks/cpu_gemv.py (BENCHMARKS.md, issue 26).
CPU_GEMV_MAX_ROWS = 4
# The quantized schemes whose layers take the C++ GEMV by default: int8 (1.2-2x torch's
# _weight_int8pack_mm at one row); int4's C++ kernel (cpmctl_cpu.gemv.int4_linear, tested, reads
# the stored nibbles) ran at 0.85x torch's repacked _weight_int4pack_mm_for_cpu, so int4 keeps torch's.
CPU_GEMV_SCHEMES = ("int8",)
CPU_GEMV_MODES = ("auto", "on", "off")
_gemv_state: dict[str, object] = {}


def cpu_gemv_problem() -> str | None:
    """Why cpmctl's C++ GEMV cannot run here (no compiler, no ninja, a failed build), or None when
    it can; the first call builds it (once per machine and source, then cached on disk)."""
    if "problem" not in _gemv_state:
        try:
            from cpmctl_cpu import CpuKernelBuildError, gemv  # optional: needs a C++ compiler and ninja
        except ImportError as exc:
            _gemv_state["problem"] = f"the CPU kernel package cpmctl_cpu is not importable ({exc})"
        else:
            try:
                gemv.ops()
                _gemv_state["problem"] = None
                _gemv_state["module"] = gemv
            except CpuKernelBuildError as exc:
                _gemv_state["problem"] = str(exc)
    return _gemv_state["problem"]


def cpu_gemv():
    """The module cpmctl_cpu.gemv (its launchers); call only where cpu_gemv_problem() is None."""
    return _gemv_state["module"]


def set_cpu_gemv(model: nn.Module, mode: str) -> str | None:
    """Whether the linear layers of `model` run cpmctl's C++ GEMV on decode-sized CPU inputs: its
    QuantizedLinear layers, and its bf16 nn.Linear layers (made CpuGemvLinear, the same parameters).
    "auto": where it builds; "on": a UserError when it cannot; "off": torch's kernels. Returns a
    note when "auto" falls back (why), else None."""
    if mode not in CPU_GEMV_MODES:
        raise UserError(f"unknown CPU GEMV mode {mode!r}; expected one of {', '.join(CPU_GEMV_MODES)}", option="cpu_gemv")
    problem = cpu_gemv_problem() if mode != "off" else None
    if mode == "on" and problem is not None:
        raise UserError(f"the C++ CPU GEMV was asked for but cannot run: {problem}", option="cpu_gemv")
    use = mode != "off" and problem is None
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            module.cpu_gemv = use and module.qweight.device.type == "cpu" and module.scheme in CPU_GEMV_SCHEMES
        elif type(module) in (nn.Linear, CpuGemvLinear):
            bf16_cpu = module.weight.dtype == torch.bfloat16 and module.weight.device.type == "cpu"
            module.__class__ = CpuGemvLinear if use and bf16_cpu else nn.Linear
    if mode == "auto" and problem is not None:
        return f"torch's CPU kernels run the linear layers: {problem}"
    return None


class CpuGemvLinear(nn.Linear):
    """nn.Linear (same parameters, same state dict) whose decode-sized calls on a bf16 CPU weight
    run cpmctl's C++ bf16 GEMV (fp32 activations and sums, the result in x's dtype); larger
    inputs (prefill) keep F.linear. Made by `set_cpu_gemv`."""

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] <= CPU_GEMV_MAX_ROWS and x.device.type == "cpu" and self.weight.dtype == torch.bfloat16:
            return cpu_gemv().bf16_linear(rows, self.weight, self.bias).view(*x.shape[:-1], self.out_features)
        return nn.functional.linear(x, self.weight, self.bias)


def check_kernels(scheme: str, device: torch.device) -> None:
    """UserError when `device` (with this torch) has no matmul for `scheme` weights."""
    device = torch.device(device)
    if device.type == "cpu":
        if not cpu_kernels_available(scheme):
            kernel = "torch._weight_int8pack_mm" if scheme == "int8" else "torch._weight_int4pack_mm_for_cpu"
            raise UserError(f"{scheme} weights on the CPU need {kernel}, which torch {torch.__version__} lacks; "
                            "dequantize the checkpoint or upgrade torch")
    elif device.type != "cuda":
        raise UserError(f"{scheme} weights have no matmul on {device.type} devices (cpu and cuda have one)")


def quantized_linear(x: Tensor, w: QuantizedView) -> Tensor:
    """x [m, in] @ W^T -> [m, out] in x's dtype: fused weight-only kernels on a CPU (bf16
    activations in, see the module docstring), dequantize-then-matmul elsewhere."""
    if x.device.type != "cpu":
        return x @ dequantize(w, x.dtype).T
    xb = x.to(torch.bfloat16)
    if w.scheme == "int8":
        y = torch._weight_int8pack_mm(xb, w.qweight, w.scales.reshape(-1).to(xb.dtype))
    else:
        packed = w.cpu_packed if w.cpu_packed is not None else cpu_int4_pack(w)
        scales_and_zeros = w.cpu_scales_zeros if w.cpu_scales_zeros is not None else cpu_int4_scales_zeros(w)
        y = torch._weight_int4pack_mm_for_cpu(xb, packed, w.group_size, scales_and_zeros.to(xb.dtype))
    return y.to(x.dtype)


class QuantizedWeight(nn.Module):
    """A module holding one quantized weight stack as buffers (qweight, scales, zeros), so that
    the state dict names them NAME.qweight, ... as stored. `transposed`: the model uses the
    weight as [*lead, in, out] (the MoE's w_out); `shape` is the shape the model sees."""

    def __init__(self, lead: tuple[int, ...], out_features: int, in_features: int, scheme: str,
                 group_size: int | None, *, transposed: bool = False) -> None:
        super().__init__()
        check_scheme(scheme, group_size, in_features)
        self.scheme, self.group_size, self.transposed = scheme, group_size, transposed
        packed_in = in_features // 2 if scheme == "int4" else in_features
        groups = in_features // group_size if scheme == "int4" else 1
        qdtype = torch.uint8 if scheme == "int4" else torch.int8
        self.register_buffer("qweight", torch.zeros(*lead, out_features, packed_in, dtype=qdtype))
        self.register_buffer("scales", torch.ones(*lead, out_features, groups, dtype=SCALE_DTYPE))
        if scheme == "int4":
            self.register_buffer("zeros", torch.zeros(*lead, out_features, groups, dtype=SCALE_DTYPE))
        else:
            self.zeros = None
        self.requires_grad = False
        self._cpu_packed: Tensor | None = None
        self._packed_from: tuple | None = None

    @property
    def shape(self) -> torch.Size:
        lead = self.qweight.shape[:-2]
        out_f, in_f = self.qweight.shape[-2], self.qweight.shape[-1] * (2 if self.scheme == "int4" else 1)
        return torch.Size((*lead, in_f, out_f) if self.transposed else (*lead, out_f, in_f))

    @property
    def dtype(self) -> torch.dtype:
        return self.qweight.dtype

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def view_all(self) -> QuantizedView:
        packed = None
        qweight = self.qweight
        if self.scheme == "int8" and qweight.device.type == "cpu":
            # an aligned copy of a misaligned (memory-mapped) stack, made once per loaded weight
            key = (qweight.data_ptr(), qweight._version)
            if self._packed_from != key:
                self._cpu_packed = cpu_aligned(qweight)
                self._packed_from = key
            qweight = self._cpu_packed
        if self.scheme == "int4" and self.qweight.device.type == "cpu":
            # The CPU kernel's layout, made once per loaded weight (keyed on the storage, which
            # loading by assignment replaces).
            key = (self.qweight.data_ptr(), self.qweight._version)
            if self._packed_from != key:
                lead = self.qweight.shape[:-2]
                flat = QuantizedView(self.scheme, self.group_size, self.qweight.reshape(-1, *self.qweight.shape[-2:]),
                                     self.scales, self.zeros)
                packs = [cpu_int4_pack(flat[i]) for i in range(flat.qweight.shape[0])]
                self._cpu_packed = torch.stack(packs).view(*lead, *packs[0].shape)
                self._packed_from = key
            packed = self._cpu_packed
        return QuantizedView(self.scheme, self.group_size, qweight, self.scales, self.zeros, packed)

    def __getitem__(self, index) -> QuantizedView:
        return self.view_all()[index]


def quantized_matmul_out(hidden: Tensor, w: QuantizedView, out: Tensor | None) -> Tensor:
    """hidden [m, in] times a weight used transposed ([in, out] as the model sees it, stored as
    the linear form [out, in]): the MoE's down projection."""
    y = quantized_linear(hidden, w)
    if out is not None:
        out.copy_(y)
        return out
    return y


# -- dense linear layers ------------------------------------------------------------------------------
class QuantizedLinear(nn.Module):
    """`nn.Linear`'s call with a weight-only int8/int4 weight: buffers qweight, scales (, zeros)
    as stored (state-dict names NAME.qweight, ... beside NAME.bias), the bias a float parameter.

    On a CPU, int4's kernel layout (and its scales/zeros arrangement) is made whenever the stored
    tensors are loaded (`prepare`, a load_state_dict post-hook) and kept as non-persistent buffers,
    so that the forward is tensor ops only: a compiled graph (inductor freezing) sees them as
    constants."""

    def __init__(self, in_features: int, out_features: int, scheme: str, group_size: int | None, *,
                 bias: bool, device=None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        check_scheme(scheme, group_size, in_features)
        self.in_features, self.out_features = in_features, out_features
        self.scheme, self.group_size = scheme, group_size
        packed_in = in_features // 2 if scheme == "int4" else in_features
        groups = in_features // group_size if scheme == "int4" else 1
        qdtype = torch.uint8 if scheme == "int4" else torch.int8
        self.register_buffer("qweight", torch.zeros(out_features, packed_in, dtype=qdtype, device=device))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=SCALE_DTYPE, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=SCALE_DTYPE, device=device)
                             if scheme == "int4" else None)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        self.register_buffer("cpu_packed", None, persistent=False)
        self.register_buffer("cpu_scales_zeros", None, persistent=False)
        self.register_load_state_dict_post_hook(lambda module, _keys: module.prepare())
        self.cpu_gemv = False  # run cpmctl's C++ GEMV for decode-sized CPU inputs (set by prepare / set_cpu_gemv)

    @classmethod
    def like(cls, linear: nn.Linear, scheme: str, group_size: int | None) -> "QuantizedLinear":
        """An empty QuantizedLinear of `linear`'s shape, on its device (meta stays meta)."""
        weight = linear.weight
        return cls(linear.in_features, linear.out_features, scheme, group_size, bias=linear.bias is not None,
                   device=weight.device, dtype=(linear.bias if linear.bias is not None else weight).dtype)

    def prepare(self) -> None:
        """Make the CPU kernel's int4 layout from the stored tensors (nothing for int8, off-CPU, on
        meta), and turn on the C++ GEMV on a CPU where it builds."""
        self.cpu_packed = self.cpu_scales_zeros = None
        self.cpu_gemv = (self.scheme in CPU_GEMV_SCHEMES and self.qweight.device.type == "cpu"
                         and cpu_gemv_problem() is None)
        if self.scheme == "int8" and self.qweight.device.type == "cpu":
            self.qweight = cpu_aligned(self.qweight)
        if self.scheme == "int4" and self.qweight.device.type == "cpu" and cpu_kernels_available("int4"):
            view = self.view(prepared=False)
            self.cpu_packed, self.cpu_scales_zeros = cpu_int4_pack(view), cpu_int4_scales_zeros(view)

    def view(self, *, prepared: bool = True) -> QuantizedView:
        return QuantizedView(self.scheme, self.group_size, self.qweight, self.scales, self.zeros,
                             self.cpu_packed if prepared else None, self.cpu_scales_zeros if prepared else None)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize(self.view(prepared=False), dtype)

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, self.in_features)
        if self.cpu_gemv and x.device.type == "cpu" and rows.shape[0] <= CPU_GEMV_MAX_ROWS:
            return self.gemv(rows).view(*x.shape[:-1], self.out_features)
        y = quantized_linear(rows, self.view())
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def gemv(self, rows: Tensor) -> Tensor:
        """rows [m, in] through cpmctl's C++ GEMV (bias added inside), in rows' dtype."""
        gemv = cpu_gemv()
        if self.scheme == "int8":
            return gemv.int8_linear(rows, self.qweight, self.scales, self.bias)
        return gemv.int4_linear(rows, self.qweight, self.scales, self.zeros, self.group_size, self.bias)

    def extra_repr(self) -> str:
        group = "" if self.group_size is None else f", group_size={self.group_size}"
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.scheme}{group}, bias={self.bias is not None}"


def output_projection(model: nn.Module) -> nn.Module | None:
    """The untied output projection (lm_head.proj) when a QuantizedLinear can take its place (its
    LM head adds no separate bias), else None."""
    head = getattr(model, "lm_head", None)
    proj = getattr(head, "proj", None)
    return proj if proj is not None and head.bias is None else None


def quantizable_linears(model: nn.Module, *, output: bool = False) -> dict[str, nn.Module]:
    """The linear layers a "linear" quantization covers, by module name: every nn.Linear (or
    QuantizedLinear) inside a block's self- and cross-attention and inside a dense FFN
    (`FeedForward` itself: not a thresholded FFN, whose gathers read the float weight rows, nor
    a MoE layer's router or experts); with `output`, also the untied output projection
    (`output_projection`). Embeddings and norms stay float."""
    found: dict[str, nn.Module] = {}
    for stack_name in ("encoder", "decoder"):
        stack = getattr(model, stack_name, None)
        if stack is None:
            continue
        for i, block in enumerate(stack.blocks):
            parts = [("attn", block.attn), ("cross_attn", block.cross_attn)]
            if type(block.ffn) is FeedForward:
                parts.append(("ffn", block.ffn))
            for part_name, part in parts:
                if part is None:
                    continue
                for name, module in part.named_modules():
                    if isinstance(module, (nn.Linear, QuantizedLinear)):
                        found[f"{stack_name}.blocks.{i}.{part_name}.{name}"] = module
    if output and (proj := output_projection(model)) is not None:
        found["lm_head.proj"] = proj
    return found


def swap_in(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule `name` of this model instance by `module`."""
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name), attr, module)


def swap_quantized_linears(model: nn.Module, scheme: str, group_size: int | None, *, output: bool = False) -> list[str]:
    """Put an empty QuantizedLinear in place of each quantizable linear layer of this instance
    (with `output`, the output projection too), for weights loaded afterwards; returns their names."""
    names = []
    for name, linear in quantizable_linears(model, output=output).items():
        if isinstance(linear, nn.Linear):
            swap_in(model, name, QuantizedLinear.like(linear, scheme, group_size))
            names.append(name)
    return names
