"""Section `hybrid`: where an offloaded expert should compute, measured on the GPU, against the
choice cpmctl's cost model (cpmctl.offload.placement, Fiddler's) makes.

1. Routes of one expert (on a GPU: d 2048, 5632 neurons, SwiGLU, bf16, 69 MB, the offload
   section's expert; its weights in pinned host memory), for 1 to 128 rows:
     device  copy the weights into a device slot, then compute there (`expert_output`)
     host    rows to the host, compute there on the host copy, outputs back
   median wall-clock of 3 synchronised runs each, against the cost model's prediction and choice
   (`choose_route("auto", ...)`) from rates measured as the engine measures them (host GEMM rate,
   device expert rate at 16 rows, host-to-device bandwidth). Figures: the predicted and measured
   crossover rows, how often the model picks the faster route, and the time of its choice over
   the faster route's at the worst row count.
2. Decoding a random MoE (4 layers, d 1024, 8 experts of 2816, 0.7 GB bf16) offloaded to
   pinned host memory (budget 25%) with
   `--expert-compute device`, `host` and `auto`, batch 1 and 8: tokens/s and how many experts
   `auto` computed on the host; greedy tokens of the three equal (same arithmetic per route on the
   GPU is not promised: the routes run on different processors).
Without CUDA (the rehearsal) the same code runs at tiny shapes with the CPU standing in for both
sides; the route timings then say nothing about a GPU, and the section records the GPU timing as
skipped.
"""

from __future__ import annotations

import gc
import math
import tempfile
from pathlib import Path

import torch

from cpmctl.gpu_check.measure import sync, wall_ms
from cpmctl.gpu_check.record import Section

GPU = dict(d=2048, expert_size=5632, rows=(1, 2, 4, 8, 16, 32, 64, 128),
           model=dict(vocab_size=32000, d_model=1024, n_heads=16, n_kv_heads=8, d_ff=2816, n_layers=4, max_positions=512,
                      moe=dict(experts=8, expert_size=2816, top_k=2, router="linear")),
           prompt=16, new_tokens=8)
REHEARSAL = dict(d=64, expert_size=128, rows=(1, 4, 16, 64),
                 model=dict(vocab_size=512, d_model=64, n_heads=4, n_kv_heads=2, d_ff=128, n_layers=2,
                            moe=dict(experts=8, expert_size=128, top_k=2, router="linear")),
                 prompt=8, new_tokens=4)
BATCHES = (1, 8)
MODES = ("device", "host", "auto")


def route_timings(section: Section, device: torch.device, sizes: dict) -> None:
    from cpmctl.moe import expert_output
    from cpmctl.offload.placement import (ComputeCosts, ExpertShape, choose_route, crossover_rows, device_seconds,
                                          host_seconds, measure_host_flops)

    d, de, dtype = sizes["d"], sizes["expert_size"], torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    host = (torch.randn(3, de, d, generator=gen) * d**-0.5).to(dtype)
    if device.type == "cuda":
        host = host.pin_memory()
    slot = torch.empty_like(host, device=device)
    nbytes = host.nbytes
    shape = ExpertShape(d, de, True, nbytes, dtype.itemsize)

    def copy_in() -> None:
        slot.copy_(host, non_blocking=True)

    copy_ms = wall_ms(copy_in, device)
    x16 = torch.randn(16, d, device=device, dtype=dtype)
    device_ms = wall_ms(lambda: expert_output(x16, slot[0], slot[1], slot[2], None, None, "silu"), device)
    costs = ComputeCosts(host_flops=measure_host_flops(d, de), device_flops=16 * shape.flops_per_row / (device_ms / 1e3),
                         h2d_bytes=nbytes / (copy_ms / 1e3))
    section.figure("host GEMM rate (cost model input)", round(costs.host_flops / 1e9, 2), "GFLOP/s")
    section.figure("device expert rate at 16 rows (cost model input)", round(costs.device_flops / 1e9, 2), "GFLOP/s")
    section.figure("host-to-device bandwidth, one expert (cost model input)", round(costs.h2d_bytes / 1e9, 2), "GB/s")
    predicted = crossover_rows(shape, costs)
    section.figure("cost model: crossover rows (host below, device above)", None if math.isinf(predicted) else round(predicted, 2),
                   "rows", note="None: the host never loses" if math.isinf(predicted) else None)

    agree, worst, measured_crossover = 0, 1.0, None
    for rows in sizes["rows"]:
        x = torch.randn(rows, d, device=device, dtype=dtype)

        def on_device() -> None:
            copy_in()
            expert_output(x, slot[0], slot[1], slot[2], None, None, "silu")

        def on_host() -> None:
            out = expert_output(x.to("cpu"), host[0], host[1], host[2], None, None, "silu")
            out.to(device)

        dev_ms, host_ms = wall_ms(on_device, device), wall_ms(on_host, device)
        choice = choose_route("auto", rows, shape, costs, cached=False)
        faster = "device" if dev_ms < host_ms else "host"
        if faster == "device" and measured_crossover is None:
            measured_crossover = rows
        agree += choice == faster
        chosen_ms = dev_ms if choice == "device" else host_ms
        worst = max(worst, chosen_ms / min(dev_ms, host_ms))
        section.row("routes of one expert", rows=rows, device_ms=round(dev_ms, 3), host_ms=round(host_ms, 3),
                    predicted_device_ms=round(1e3 * device_seconds(rows, shape, costs, cached=False), 3),
                    predicted_host_ms=round(1e3 * host_seconds(rows, shape, costs), 3), model_choice=choice,
                    measured_faster=faster)
    section.figure("measured crossover rows (first row count where the device route wins)", measured_crossover, "rows",
                   note=None if measured_crossover is not None else f"the host route won up to {sizes['rows'][-1]} rows")
    section.figure("cost model picks the faster route", round(agree / len(sizes["rows"]), 4), "fraction")
    section.figure("time of the cost model's choice / the faster route, worst row count", round(worst, 4), "x", at_most=1.5)
    del slot
    gc.collect()


def decode_by_mode(section: Section, device: torch.device, sizes: dict) -> None:
    from cpmctl.checkpoint import save_model
    from cpmctl.config import ModelConfig
    from cpmctl.generate import generate
    from cpmctl.model import build_model
    from cpmctl.offload import checkpoint_weight_bytes, load_offloaded
    from cpmctl.units import parse_size

    config = ModelConfig.from_preset("llama-tiny", **sizes["model"], eos_token_id=None)
    gen = torch.Generator().manual_seed(5)
    prompts = {b: torch.randint(3, config.vocab_size, (b, sizes["prompt"]), generator=gen) for b in BATCHES}
    with tempfile.TemporaryDirectory(prefix="cpmctl-gpu-check-hybrid-") as tmp:
        path = Path(tmp) / "moe"
        torch.manual_seed(0)
        save_model(build_model(config, dtype=torch.bfloat16), path)
        budget = parse_size("25%", total=checkpoint_weight_bytes(path))
        rates: dict[tuple[str, int], float] = {}
        outputs: dict[tuple[str, int], torch.Tensor] = {}
        for mode in MODES:
            # on a CPU (rehearsal) "device" compute reads from disk: a host copy only serves a GPU or the host route
            store = "disk" if (device.type != "cuda" and mode == "device") else "cpu"
            model, ckpt, engine = load_offloaded(path, mode=store, budget=budget, device=device, dtype=None, expert_compute=mode)
            try:
                for b in BATCHES:
                    generate(model, prompts[b], max_new_tokens=1, eos_token_id=None)  # warm-up
                    before = engine.stats()["experts_computed_on_host"]
                    out, stats = generate(model, prompts[b], max_new_tokens=sizes["new_tokens"], eos_token_id=None)
                    rates[(mode, b)], outputs[(mode, b)] = stats["decode_tokens_per_s"], out.cpu()
                    section.row("decode by expert compute", mode=mode, batch=b,
                                decode_tokens_per_s=round(stats["decode_tokens_per_s"], 3),
                                experts_computed_on_host=engine.stats()["experts_computed_on_host"] - before)
            finally:
                engine.close()
                ckpt.close()
            gc.collect()
    for b in BATCHES:
        for other in ("device", "host"):
            section.figure(f"batch {b}: auto tokens/s / {other} tokens/s", round(rates[("auto", b)] / rates[(other, b)], 4), "x")
        same = float((outputs[("auto", b)] == outputs[("device", b)]).float().mean())
        section.figure(f"batch {b}: greedy tokens of auto equal to device's", round(same, 4), "fraction")


def run(section: Section) -> None:
    device = torch.device(section.device)
    sizes = REHEARSAL if section.rehearsal else GPU
    if device.type != "cuda":
        section.skip("GPU route timing", "no CUDA device: the CPU stands in for both sides (rehearsal), so these "
                                         "timings exercise the code, not a GPU")
    if section.fits("routes of one expert", 6 if section.rehearsal else 12):
        route_timings(section, device, sizes)
    sync(device)
    if section.fits("decode by expert compute", 8 if section.rehearsal else 14):
        decode_by_mode(section, device, sizes)
