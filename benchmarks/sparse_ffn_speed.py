"""Batch-1 CPU speed of sparse FFNs at llama-100m size: a ReLU MoE at 25% of experts and TEAL thresholds
against the dense SwiGLU model, on the torch path and on the C++ kernels (cpmctl_cpu.sparse_ffn).

    PYTHONPATH=.:kernels OMP_NUM_THREADS=1 flock /work/notes/timing.lock .venv/bin/python benchmarks/sparse_ffn_speed.py

One random-weight model of the `llama-100m` preset (d 768, d_ff 2048 gated SiLU, 12 layers, vocab
32,000 tied; --d-ff / --layers / --vocab change it). Speed does not depend on what the weights learned,
except through how many entries are skipped: the thresholds are calibrated (`threshold_ffn_from_dense`)
on this model's own FFN inputs of a --calib-tokens random-token sequence, and the ReLU MoE's hidden
zeros are a random ReLU layer's (about half). Quality figures come from the trained runs
(benchmarks/relufy_lm.py), not from here.

Variants (each a set of FFN modules swapped into the same model, so attention, embeddings and the
LM head are shared):
- dense SwiGLU, eager (`FeedForward`, F.linear);
- dense through the kernel: the threshold kernel with every row kept (thresholds -1), the honest
  same-kernel baseline; and (FFNs only) the MoE kernel with every expert selected;
- ReLU MoE, experts of --expert-size, --ratio of them per token, MLP router (MoEfication's), on the
  torch path and on the kernel;
- thresholds at each of --sparsities on the kernel, and the torch (embedding_bag) path at 0.4.
Timing: 1 torch thread; per round every variant in turn (same process, alternating): --calls passes of
one token through its 12 FFN modules (each fed its own layer's recorded input), then --calls 1-token
forwards of the whole model; the median over --rounds rounds. The arithmetic ceiling of the whole
model at a fraction f of the FFN is 1 / (rest + f * ffn share), rest = 1 - ffn share, from the
measured dense times. Figures go to stdout (a Markdown table) and --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernels"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_model  # noqa: E402


def build(args):
    import torch

    from cpmctl import moefication as mf
    from cpmctl.config import ModelConfig
    from cpmctl.model import build_model
    from cpmctl.moe import moe_from_dense

    torch.manual_seed(args.seed)
    config = ModelConfig.from_preset("llama-100m", d_ff=args.d_ff, n_layers=args.layers, vocab_size=args.vocab)
    model = build_model(config).eval()
    dense = [f for _, _, f in model.ffn_modules()]
    inputs = {}
    hooks = [f.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0].reshape(-1, a[0].shape[-1]).detach()))
             for i, f in enumerate(dense)]
    with torch.no_grad():
        model(input_ids=torch.randint(3, config.vocab_size, (1, args.calib_tokens)))
    for h in hooks:
        h.remove()
    last = [inputs[i][-1:].clone() for i in range(len(dense))]  # each layer's input for the FFN-only timing

    variants: dict[str, list] = {"dense swiglu (eager)": dense}
    all_rows = []
    tcfg = config.replace(threshold_sparsity=0.5)
    for i, f in enumerate(dense):
        t = mf.threshold_ffn_from_dense(f, tcfg, inputs[i], None)
        t.threshold_in.fill_(-1.0)
        t.threshold_hidden.fill_(-1.0)
        t.kernels = "cpu"
        all_rows.append(t.eval())
    variants["dense via kernel (all rows)"] = all_rows
    e = args.d_ff // args.expert_size
    k = max(1, round(args.ratio * e))
    mcfg = config.replace(activation="relu", moe=dict(experts=e, expert_size=args.expert_size, top_k=k, router="mlp", permuted=True))
    relu_cfg = config.replace(activation="relu")
    moe_torch, moe_cpu = [], []
    for f in dense:
        relu = type(f)(relu_cfg)
        relu.load_state_dict(f.state_dict())
        layer = moe_from_dense(relu, mcfg, torch.randperm(args.d_ff)).eval()
        torch.nn.init.normal_(layer.router.proj.weight, std=0.05)
        moe_torch.append(layer)
        twin = moe_from_dense(relu, mcfg, layer.perm.clone()).eval()
        twin.load_state_dict(layer.state_dict())
        twin.kernels = "cpu"
        moe_cpu.append(twin)
    variants[f"relu moe {args.ratio:.0%} (torch)"] = moe_torch
    variants[f"relu moe {args.ratio:.0%} (kernel)"] = moe_cpu
    for s in args.sparsities:
        for kernels in (("cpu", "torch") if s == 0.4 else ("cpu",)):
            layers = []
            for i, f in enumerate(dense):
                t = mf.threshold_ffn_from_dense(f, tcfg, inputs[i], s).eval()
                t.kernels = kernels
                layers.append(t)
            variants[f"threshold {s:.0%} ({'kernel' if kernels == 'cpu' else 'torch'})"] = layers
    return model, variants, last, (e, k)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-ff", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--expert-size", type=int, default=32)
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--sparsities", type=lambda s: [float(v) for v in s.split(",")], default=[0.25, 0.4, 0.5])
    parser.add_argument("--calib-tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import torch

    from cpmctl.moe import MoEFeedForward
    from cpmctl_cpu import sparse_ffn as sf

    torch.set_num_threads(args.threads)
    print(f"# {cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC", flush=True)
    t0 = time.perf_counter()
    sf.ops()
    model, variants, last, (e, k) = build(args)
    print(f"# built in {time.perf_counter() - t0:.1f} s: llama-100m shape, d_ff {args.d_ff}, {args.layers} layers, vocab {args.vocab}; "
          f"MoE {e} experts of {args.expert_size}, top-{k}", flush=True)
    dense = variants["dense swiglu (eager)"]
    ids = torch.tensor([[5]])

    def every_expert(x, layer):  # the MoE kernel with all experts selected (same-kernel dense baseline, FFNs only)
        return sf.moe_ffn(x, all_ids, None, layer.w_in, layer.w_gate, layer.w_out, None, None, None, "silu")

    gated = []
    for f in dense:  # the dense SwiGLU FFN as a gated expert stack, for every_expert
        mcfg = model.config.replace(moe=dict(experts=e, expert_size=args.expert_size, top_k=e, router="mlp", permuted=True))
        from cpmctl.moe import moe_from_dense

        gated.append(moe_from_dense(f, mcfg, torch.arange(args.d_ff)).eval())
    all_ids = torch.arange(e).view(1, -1)
    ffn_only = {"dense via MoE kernel (all experts)": lambda: [every_expert(x, g) for x, g in zip(last, gated)]}
    times = {name: {"ffn": [], "model": []} for name in variants}
    times["dense via MoE kernel (all experts)"] = {"ffn": []}
    skipped: dict[str, list[float]] = {}
    with torch.no_grad():
        for r in range(args.rounds):
            for name, ffns in variants.items():
                for (stack, index, _), f in zip(model.ffn_modules(), ffns):
                    model.replace_ffn(stack, index, f)
                for x, f in zip(last, ffns):
                    f(x)  # warm-up (the thresholded FFNs' transposed weights on the first round)
                t = time.perf_counter()
                for _ in range(args.calls):
                    for x, f in zip(last, ffns):
                        f(x)
                times[name]["ffn"].append((time.perf_counter() - t) / args.calls)
                model(input_ids=ids)
                t = time.perf_counter()
                for _ in range(args.calls):
                    model(input_ids=ids)
                times[name]["model"].append((time.perf_counter() - t) / args.calls)
                if r == 0 and isinstance(ffns[0], MoEFeedForward):
                    hidden = [(f.expert_activations(x)[0][f.route(x)[0][0]] == 0).float().mean().item() for x, f in zip(last, ffns)]
                    skipped[name] = hidden
            for name, fn in ffn_only.items():
                fn()
                t = time.perf_counter()
                for _ in range(args.calls):
                    fn()
                times[name]["ffn"].append((time.perf_counter() - t) / args.calls)
    for (stack, index, _), f in zip(model.ffn_modules(), dense):
        model.replace_ffn(stack, index, f)
    med = {name: {key: statistics.median(v) for key, v in t.items()} for name, t in times.items()}
    base = med["dense swiglu (eager)"]
    ffn_share = base["ffn"] / base["model"]
    rows = {}
    for name, t in med.items():
        rows[name] = {**{f"{key}_us": 1e6 * v for key, v in t.items()}, "ffn_speedup": base["ffn"] / t["ffn"]}
        if "model" in t:
            rows[name]["model_speedup"] = base["model"] / t["model"]
    print(f"FFN share of the dense 1-token forward: {ffn_share:.2f} (FFNs {1e6 * base['ffn']:.0f} us of {1e6 * base['model']:.0f} us)")
    for f in [args.ratio] + [1 - s for s in args.sparsities]:
        print(f"  whole-model ceiling at {f:.0%} of the FFN work: {1 / (1 - ffn_share + f * ffn_share):.2f}x")
    if skipped:
        print("ReLU zeros among the selected experts' neurons (their down-projection rows the kernel skips): "
              + ", ".join(f"{statistics.mean(v):.2f}" for v in skipped.values()))
    print("| variant | FFNs, 1 token (us) | FFN speed-up | whole model, 1 token (us) | speed-up |")
    print("|---|---|---|---|---|")
    for name, row in rows.items():
        model_cells = f"{row['model_us']:.0f} | {row['model_speedup']:.2f}x" if "model_us" in row else "- | -"
        print(f"| {name} | {row['ffn_us']:.0f} | {row['ffn_speedup']:.2f}x | {model_cells} |")
    if args.out is not None:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "ffn_share": ffn_share, "rows": rows,
                                        "relu_zeros": skipped}, indent=1))


if __name__ == "__main__":
    main()
