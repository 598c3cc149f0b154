"""Compile every kernel for an NVIDIA GPU target, without a GPU: catches what the interpreter lets
through (tl.dot shapes and dtypes the hardware rejects, layout and type errors, shared memory).

    TRITON_INTERPRET=0 python -m cpmctl_kernels.compile_check [--arch 90] [--quick] [--only LABEL]

Each kernel is lowered to a cubin with the ptxas bundled in the triton wheel, for every dtype and
for each compile-time branch (gated or not, biases, activations, combine mode) with the GPU
block sizes the launchers use. It does not run anything, so it says nothing about results or
speed. Prints one line per kernel variant and exits 1 if any fails to compile.
"""

from __future__ import annotations

import argparse
import itertools
import sys

DTYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


def _signature(fn, pointers: dict[str, str], constexprs: dict) -> dict[str, str]:
    """Triton signature: pointers as given, constexprs marked, every other argument an i32."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = "*" + pointers[name]
        else:
            sig[name] = "i32"
    return sig


def _variants():
    """(label, jit function, pointer dtypes, constexprs, num_warps, num_stages) to compile."""
    from cpmctl_kernels import _common, decode_ffn, grouped_ffn, routing

    up = grouped_ffn._grouped_up_kernel.fn
    down = grouped_ffn._grouped_down_kernel.fn
    for dtype, (bf, bk), gated, act in itertools.product(DTYPES.values(), [(64, 64), (16, 128), (128, 128)],
                                                         [False, True], [0, 2, 3]):
        t = dtype
        pointers = dict(x_ptr=t, w_in_ptr=t, w_gate_ptr=t, b_in_ptr=t, b_gate_ptr=t, hidden_ptr=t,
                        sorted_ids_ptr="i32", block_expert_ptr="i32", num_padded_ptr="i32")
        const = dict(GATED=gated, HAS_B_IN=True, HAS_B_GATE=gated, ACTIVATION=act, UPCAST=t == "fp32",
                     BLOCK_M=64 if bf != 16 else 16, BLOCK_F=bf, BLOCK_K=bk)
        yield f"grouped_up {t} F{bf} K{bk} gated={gated} act={act}", up, pointers, const, 8 if bf == 128 else 4, 3
    for dtype, combine, (bd, bf) in itertools.product(DTYPES.values(), [0, 1, 2], [(128, 64), (128, 16), (256, 64)]):
        t = dtype
        out = t if combine == 0 else "fp32"
        pointers = dict(hidden_ptr=t, w_out_ptr=t, weights_ptr=t, b_out_ptr=t, out_ptr=out,
                        sorted_ids_ptr="i32", block_expert_ptr="i32", num_padded_ptr="i32")
        const = dict(COMBINE=combine, HAS_B_OUT=True, UPCAST=t == "fp32", BLOCK_M=32, BLOCK_D=bd, BLOCK_F=bf)
        yield f"grouped_down {t} D{bd} F{bf} combine={combine}", down, pointers, const, 8 if bd == 256 else 4, 3
    for t in DTYPES.values():
        pointers = dict(partial_ptr="fp32", b_out_ptr=t, out_ptr=t)
        yield f"combine {t}", _common.combine_rows_kernel, pointers, dict(HAS_B_OUT=True, BLOCK_N=8, BLOCK_D=128), 4, 1
        for gated, block_r in itertools.product([False, True], [2, 16]):
            pointers = dict(x_ptr=t, w_in_ptr=t, w_gate_ptr=t, b_in_ptr=t, b_gate_ptr=t, ids_ptr="i64", hidden_ptr="fp32",
                            acc_ptr="fp32")
            const = dict(GATED=gated, HAS_B_IN=True, HAS_B_GATE=gated, ACTIVATION=1, BLOCK_R=block_r, BLOCK_K=256,
                         ZERO_BLOCK=16 if block_r == 2 else 0)
            yield f"decode_up {t} R{block_r} gated={gated}", decode_ffn._decode_up_kernel, pointers, const, 4, 3
        for atomic in (False, True):
            pointers = dict(hidden_ptr="fp32", w_out_ptr=t, ids_ptr="i64", weights_ptr=t, b_out_ptr=t,
                            out_ptr="fp32" if atomic else t)
            const = dict(HAS_B_OUT=True, ATOMIC=atomic, BLOCK_R=32, BLOCK_D=128)
            yield f"decode_down {t} atomic={atomic}", decode_ffn._decode_down_kernel, pointers, const, 4, 3
        pointers = dict(logits_ptr=t, ids_ptr="i64", weights_ptr=t)
        for k, e, soft_all in ((1, 8, False), (2, 512, True), (8, 64, False)):
            const = dict(K=k, BLOCK_K=max(1, 1 << (k - 1).bit_length()), SOFTMAX_ALL=soft_all,
                         BLOCK_N=max(1, min(16, 4096 // e)), BLOCK_E=e)
            yield f"route {t} k={k} E={e}", routing._topk_softmax_kernel, pointers, const, 4, 1
    yield from _quantized_variants(up, down, decode_ffn)
    for e in (8, 512, 4096):
        chunk = max(16, min(256, 8192 // e))
        yield f"align_count E={e}", routing._align_count_kernel, dict(ids_ptr="i64", chunk_counts_ptr="i32"), \
            dict(CHUNK=chunk, BLOCK_E=e), 4, 1
        yield f"align_offsets E={e}", routing._align_offsets_kernel, dict(
            chunk_counts_ptr="i32", expert_start_ptr="i32", expert_counts_ptr="i32", block_expert_ptr="i32",
            num_padded_ptr="i32"), dict(BLOCK_SIZE=64, BLOCK_E=e, FILL=chunk), 4, 1
        yield f"align_scatter E={e}", routing._align_scatter_kernel, dict(
            ids_ptr="i64", chunk_offsets_ptr="i32", expert_start_ptr="i32", sorted_ids_ptr="i32"), \
            dict(CHUNK=chunk, BLOCK_E=e), 4, 1


def _quantized_variants(up, down, decode_ffn):
    """The int8 (QUANT=1) and int4 (QUANT=2) weight variants of the FFN kernels: int8 / uint8
    codes, bf16 scales and zeros (as cpmctl.quant stores them), group 64."""
    for (scheme, code, q), t in itertools.product([("int8", 1, "i8"), ("int4", 2, "u8")], DTYPES.values()):
        scale = dict(s_in_ptr="bf16", z_in_ptr="bf16", s_gate_ptr="bf16", z_gate_ptr="bf16")
        pointers = dict(x_ptr=t, w_in_ptr=q, w_gate_ptr=q, b_in_ptr=t, b_gate_ptr=t, hidden_ptr=t,
                        sorted_ids_ptr="i32", block_expert_ptr="i32", num_padded_ptr="i32", **scale)
        const = dict(GATED=True, HAS_B_IN=True, HAS_B_GATE=True, ACTIVATION=3, UPCAST=t == "fp32",
                     BLOCK_M=16, BLOCK_F=64, BLOCK_K=64, QUANT=code, GROUP=64)
        yield f"grouped_up {scheme} {t}", up, pointers, const, 4, 3
        pointers = dict(hidden_ptr=t, w_out_ptr=q, weights_ptr=t, b_out_ptr=t, out_ptr="fp32", sorted_ids_ptr="i32",
                        block_expert_ptr="i32", num_padded_ptr="i32", s_out_ptr="bf16", z_out_ptr="bf16")
        const = dict(COMBINE=2, HAS_B_OUT=True, UPCAST=t == "fp32", BLOCK_M=16, BLOCK_D=128, BLOCK_F=64,
                     QUANT=code, GROUP=64)
        yield f"grouped_down {scheme} {t}", down, pointers, const, 4, 3
        pointers = dict(x_ptr=t, w_in_ptr=q, w_gate_ptr=q, b_in_ptr=t, b_gate_ptr=t, ids_ptr="i64", hidden_ptr="fp32",
                        acc_ptr="fp32", **scale)
        const = dict(GATED=True, HAS_B_IN=True, HAS_B_GATE=True, ACTIVATION=3, BLOCK_R=2, BLOCK_K=256, ZERO_BLOCK=16,
                     QUANT=code, GROUP=64)
        yield f"decode_up {scheme} {t}", decode_ffn._decode_up_kernel, pointers, const, 4, 3
        pointers = dict(hidden_ptr="fp32", w_out_ptr=q, ids_ptr="i64", weights_ptr=t, b_out_ptr=t, out_ptr="fp32",
                        s_out_ptr="bf16", z_out_ptr="bf16")
        const = dict(HAS_B_OUT=True, ATOMIC=True, BLOCK_R=32, BLOCK_D=128, QUANT=code, GROUP=64)
        yield f"decode_down {scheme} {t}", decode_ffn._decode_down_kernel, pointers, const, 4, 3


# One or two variants of each kernel, the riskiest branches (bf16 dots, 16-wide tiles, atomics):
# what the default test suite compiles; the slow test compiles them all.
QUICK = (
    "grouped_up bf16 F16 K128 gated=True act=3", "grouped_up fp32 F64 K64 gated=False act=2",
    "grouped_down fp16 D128 F16 combine=2", "grouped_down bf16 D256 F64 combine=0", "combine bf16",
    "decode_up fp16 R2 gated=True", "decode_down bf16 atomic=True", "route fp16 k=2 E=512",
    "align_count E=512", "align_offsets E=512", "align_scatter E=512",
    "grouped_up int4 bf16", "grouped_down int8 fp16", "decode_up int4 fp16", "decode_down int8 bf16",
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200, 80: A100)")
    parser.add_argument("--only", default="", help="compile only variants whose label contains this")
    parser.add_argument("--quick", action="store_true", help="only the representative variants in QUICK")
    args = parser.parse_args(argv)

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from cpmctl_kernels import INTERPRETER

    if INTERPRETER:
        print("error: TRITON_INTERPRET=1 is set; run with TRITON_INTERPRET=0 to compile for a GPU", file=sys.stderr)
        return 2
    target = GPUTarget("cuda", args.arch, 32)
    failures = 0
    for label, fn, pointers, const, warps, stages in _variants():
        if args.only not in label or (args.quick and label not in QUICK):
            continue
        if "QUANT" in fn.arg_names and "QUANT" not in const:
            # float weights: the scale and zero pointers are placeholders the kernel never reads
            const = dict(const, QUANT=0, GROUP=1)
            pointers = dict({name: "fp32" for name in fn.arg_names if name[:2] in ("s_", "z_")}, **pointers)
        try:
            src = ASTSource(fn=fn, signature=_signature(fn, pointers, const), constexprs=const)
            compiled = triton.compile(src, target=target, options=dict(num_warps=warps, num_stages=stages))
            smem = compiled.metadata.shared
            print(f"ok    {label} (shared {smem} B)")
        except Exception as exc:  # report every variant, then fail
            failures += 1
            first = str(exc).strip().splitlines()
            print(f"FAIL  {label}: {type(exc).__name__}: {first[0] if first else ''}")
    print(f"{failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
