"""Cache policies on routing traces: Belady's MIN as the ceiling, LRU/LFU/InfMoE against known
answers, cpmctl's policy against the real `UnitCache`, prefetch precision and recall."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from cpmctl.config import ModelConfig
from cpmctl.model import build_model
from cpmctl.offload.cache import CopySlots, UnitCache
from cpmctl.offload.policy import (POLICIES, compare_policies, expert_skew, prefetch_quality, simulate,
                                   token_reuse)
from cpmctl.offload.reader import Part, Unit
from cpmctl.offload.trace import record_routing, routed_layers

# The textbook reference string (Belady's anomaly): 3 frames give OPT 7 faults, LRU 10, FIFO 9;
# 4 frames give FIFO 10 faults, more than with 3.
CLASSIC = [[k] for k in (1, 2, 3, 4, 1, 2, 5, 1, 2, 3, 4, 5)]


def test_known_answers_on_the_classic_reference_string():
    hits = {p: simulate(CLASSIC, 3, p).hits for p in POLICIES}
    assert hits == {"min": 12 - 7, "lru": 12 - 10, "infmoe": 12 - 9, "lfu": 2}
    assert simulate(CLASSIC, 4, "infmoe").hits == 12 - 10  # FIFO's anomaly
    assert simulate(CLASSIC, 4, "min").hits == 12 - 6


def test_min_is_the_ceiling_on_random_layered_traces():
    rng = random.Random(0)
    for trial in range(30):
        layers, experts, k = rng.randint(1, 4), rng.randint(2, 9), rng.randint(1, 3)
        hot = [rng.random() ** 3 for _ in range(experts)]
        trace = [[(layer, e) for e in sorted(set(rng.choices(range(experts), weights=hot, k=k)))]
                 for _ in range(25) for layer in range(layers)]
        for slots in range(1, layers * experts + 1):
            best = simulate(trace, slots, "min").hits
            assert all(simulate(trace, slots, p).hits <= best for p in POLICIES), (trial, slots)
        # everything fits: only the first use of each key misses
        assert simulate(trace, layers * experts, "lru").hits == sum(map(len, trace)) - len({k for c in trace for k in c})


def test_a_call_larger_than_the_cache_streams_through_it():
    trace = [["a", "b", "c"], ["a", "b", "c"]]
    assert simulate(trace, 1, "min").hits == 1  # c is left in, and the next call takes it first
    assert simulate(trace, 2, "min").hits == 2  # a, c kept; then a hit, a evicted for b, c hit
    assert simulate(trace, 3, "lfu").hits == 3


def _fake_cache(slots: int) -> UnitCache:
    store = CopySlots(slots, 4, torch.float32, torch.device("cpu"), lambda unit, row: (row.zero_(), row.nbytes)[1])
    return UnitCache(slots, store)


def test_the_lfu_model_is_what_unit_cache_does():
    rng = random.Random(3)
    trace = [sorted(set(rng.choices(range(10), weights=[8, 5, 4, 3, 2, 1, 1, 1, 1, 1], k=rng.randint(1, 3))))
             for _ in range(120)]
    units = {e: Unit(e, [Part("w", (4,), Path(), 0, 16, torch.float32, None)], [0]) for e in range(10)}
    for slots in (3, 5):
        cache = _fake_cache(slots)
        try:
            for call in trace:  # as OffloadedMoE does: pin the hits, then load the misses in order
                hits = cache.pin_cached(call)
                for e in call:  # one load at a time, so that the loader thread's timing decides nothing
                    if e not in hits:
                        cache.request(units[e])
                        cache.acquire(units[e])
                for e in call:
                    cache.release(units[e])
        finally:
            cache.close()
        assert cache.hits == simulate(trace, slots, "lfu").hits


def test_compare_policies_reports_shares_of_min():
    rows = compare_policies(CLASSIC, units=5, fractions=(0.6,))
    by = {r["policy"]: r for r in rows}
    assert by["min"]["slots"] == 3 and by["min"]["of_min"] == 1.0
    assert by["lru"]["of_min"] == pytest.approx((2 / 12) / (5 / 12), abs=1e-4)


def test_prefetch_precision_and_recall():
    q = prefetch_quality([[1, 2], [3], [4, 5, 6]], [[1], [3, 7], [4, 5]])
    assert q["precision"] == pytest.approx(4 / 6) and q["recall"] == pytest.approx(4 / 5)
    with pytest.raises(ValueError):
        prefetch_quality([[1]], [])


def test_skew_and_reuse():
    uniform = [[0], [1], [2], [3]] * 5
    assert expert_skew(uniform)["entropy"] == 1.0
    skewed = expert_skew([[0]] * 9 + [[1]] + [[2]] * 0)
    assert skewed["top10_share"] == 0.9 and skewed["entropy"] < 0.5
    # two steps of two layers: step 2 keeps 1 of 2 experts in layer 0 and both in layer 1
    assert token_reuse([[["a", "b"], ["c"]], [["a", "x"], ["c"]]]) == pytest.approx(2 / 3)


def test_recorded_routing_matches_the_layers_and_their_pre_gated_guesses():
    torch.manual_seed(0)
    cfg = ModelConfig(arch="decoder", vocab_size=64, d_model=16, n_heads=2, d_ff=64, n_layers=3, position="rotary",
                      activation="silu", gated=True, eos_token_id=None, moe=dict(experts=6, expert_size=8, top_k=2),
                      init_std=0.3)
    model = build_model(cfg).eval()
    seen = {}
    layers = routed_layers(model)
    for stack, i, ffn in layers:  # capture each layer's input independently of the recorder
        ffn.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0].reshape(-1, 16).clone()))
    trace, handles = record_routing(model)
    ids = torch.randint(0, 64, (2, 5))
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    assert len(trace.calls) == 3 and trace.tokens == [10, 10, 10] and trace.guesses[0] is None
    for j, (stack, i, ffn) in enumerate(layers):
        assert trace.calls[j] == [(stack, i, e) for e in sorted(set(ffn.route(seen[i])[0].flatten().tolist()))]
        if j:  # layer j's router on layer j-1's input
            guess = sorted(set(ffn.route(seen[layers[j - 1][1]])[0].flatten().tolist()))
            assert trace.guesses[j] == [(stack, i, e) for e in guess]


# -- where experts compute (Fiddler's cost model, llama.cpp's per-layer pin) -------------------------
from cpmctl.errors import UserError  # noqa: E402
from cpmctl.offload.placement import (ComputeCosts, ExpertShape, check_expert_compute, choose_route,  # noqa: E402
                                      crossover_rows, device_seconds, host_pinned, host_seconds)

# A 1 MiB fp32 expert (d 256, d_e 512, gated = 3 * 256 * 512 * 4 bytes = 1.5 MiB), a GPU 100x the
# host's GEMM rate, 10 GB/s over PCIe.
SHAPE = ExpertShape(d_model=256, expert_size=512, gated=True, weight_bytes=3 * 256 * 512 * 4)
COSTS = ComputeCosts(host_flops=50e9, device_flops=5e12, h2d_bytes=10e9)


def test_costs_follow_the_model():
    flops = 2 * 256 * 512 * 3
    assert SHAPE.flops_per_row == flops
    assert device_seconds(4, SHAPE, COSTS, cached=False) == pytest.approx(SHAPE.weight_bytes / 10e9 + 4 * flops / 5e12)
    assert device_seconds(4, SHAPE, COSTS, cached=True) == pytest.approx(4 * flops / 5e12)
    assert host_seconds(4, SHAPE, COSTS) == pytest.approx(4 * flops / 50e9 + 2 * 4 * 256 * 4 / 10e9)


def test_few_rows_compute_on_the_host_many_rows_copy_the_expert():
    cross = crossover_rows(SHAPE, COSTS)
    assert 5 < cross < 100  # ~157 us of copy against ~16 us of host compute per row
    below, above = int(cross), int(cross) + 1
    assert choose_route("auto", 1, SHAPE, COSTS, cached=False) == "host"
    assert choose_route("auto", below, SHAPE, COSTS, cached=False) == "host"
    assert choose_route("auto", above, SHAPE, COSTS, cached=False) == "device"
    # an expert already in a device slot never goes back to the host in auto mode
    assert choose_route("auto", 1, SHAPE, COSTS, cached=True) == "device"
    # a host faster per row than the device (activations included): the copy never pays
    assert crossover_rows(SHAPE, ComputeCosts(1e14, 5e12, 1e12)) == float("inf")
    assert choose_route("auto", 10_000, SHAPE, ComputeCosts(1e14, 5e12, 1e12), cached=False) == "host"


def test_modes_and_the_per_layer_pin():
    assert choose_route("device", 1, SHAPE, COSTS, cached=False) == "device"
    assert choose_route("host", 1000, SHAPE, COSTS, cached=True) == "host"
    pinned = [host_pinned(i, 2) for i in range(4)]
    assert pinned == [True, True, False, False]
    assert choose_route("auto", 1000, SHAPE, COSTS, cached=False, pinned=True) == "host"
    assert choose_route("auto", 1000, SHAPE, COSTS, cached=True, pinned=True) == "device"  # nothing to move
    with pytest.raises(UserError, match="must be >= 0"):
        host_pinned(0, -1)


def test_host_compute_needs_a_host_copy():
    check_expert_compute("host", host_copy=True)
    check_expert_compute("device", host_copy=False)
    with pytest.raises(UserError, match=r"computing experts on the host \(host\) needs a host copy"):
        check_expert_compute("host", host_copy=False)
    with pytest.raises(UserError, match="unknown expert compute"):
        check_expert_compute("gpu", host_copy=True)
