"""cpmctl's Triton kernels for sparse FFN and expert routing.

The package lives in the top-level kernels/ folder and imports as `cpmctl_kernels` (the bare
name `kernels` belongs to a PyPI package).
"""

from cpmctl_kernels._common import ACTIVATION_CODES, INTERPRETER, KernelInputError
from cpmctl_kernels.ops import DECODE_MAX_TOKENS, decode_moe_ffn, grouped_moe_ffn, moe_ffn
from cpmctl_kernels.quant import QuantizedWeights
from cpmctl_kernels.routing import MoEAlignment, moe_align, route
from cpmctl_kernels.threshold_gemv import threshold_gemv

ACTIVATIONS = tuple(ACTIVATION_CODES)

__all__ = [
    "ACTIVATIONS",
    "DECODE_MAX_TOKENS",
    "INTERPRETER",
    "KernelInputError",
    "MoEAlignment",
    "QuantizedWeights",
    "decode_moe_ffn",
    "grouped_moe_ffn",
    "moe_align",
    "moe_ffn",
    "route",
    "threshold_gemv",
]
