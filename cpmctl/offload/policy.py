"""Cache policies measured on a routing trace: Belady's MIN (the ceiling), LRU, LFU, the InfMoE
order and cpmctl's own policy, plus the precision and recall of pre-gated prefetching.

A trace is what one offloaded run asks of its expert cache: a list of layer calls, each the
experts (as hashable keys, e.g. (stack, layer, expert)) that one MoE layer needs for one forward
call, in the order the layers run. The simulated cache holds `slots` experts shared by every
layer (as `UnitCache` does). Within a layer call the experts already cached are hits (taken first, as the
engine pins them before loading anything); each missing one is loaded into a free slot or evicts a key the call does not itself need (when every
cached key is needed by the call, the one whose own use is over is taken: a call larger than the
cache streams through it, as the engine does).

Policies (the victim among the evictable keys):
- `min`: Belady's MIN, the key whose next use is furthest away (never used again first). With a
  known trace no demand-paging policy has more hits: it is the ceiling the others are judged by.
- `lru`: least recently used.
- `lfu`: least frequently used so far, ties broken by least recently used. This is cpmctl's
  default (`UnitCache._victim`).
- `infmoe`: first in, first out: InfMoE streams experts through its K slots in compute order, so a
  slot is reused in the order it was filled, whatever was used since.

Everything here is pure: it reads a trace and returns counts. The trace is recorded from a model
by `record_routing` (forward pre-hooks on the MoE layers, which also record the pre-gated guess of
the next layer's experts: that layer's router applied to the current layer's input).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

POLICIES = ("min", "lru", "lfu", "infmoe")
DEFAULT_POLICY = "lfu"  # what UnitCache does

Trace = Sequence[Sequence[Hashable]]


@dataclass(frozen=True)
class CacheResult:
    policy: str
    slots: int
    hits: int
    requests: int

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requests if self.requests else 0.0


def _next_uses(trace: Trace) -> list[list[int]]:
    """For each call i and each of its keys (in order), the position in the flattened request
    sequence of the key's next request (the sequence's length when never again)."""
    total = sum(len(call) for call in trace)
    upcoming: dict[Hashable, int] = {}
    out: list[list[int]] = [[] for _ in trace]
    position = total
    for i in range(len(trace) - 1, -1, -1):
        call = trace[i]
        position -= len(call)
        out[i] = [0] * len(call)
        for j in range(len(call) - 1, -1, -1):
            out[i][j] = upcoming.get(call[j], total)
            upcoming[call[j]] = position + j
    return out


def simulate(trace: Trace, slots: int, policy: str) -> CacheResult:
    """Hits of `policy` with `slots` expert slots over `trace` (starting empty)."""
    if policy not in POLICIES:
        raise ValueError(f"unknown cache policy {policy!r}; expected one of {', '.join(POLICIES)}")
    if slots < 1:
        raise ValueError(f"a cache needs at least one slot, got {slots}")
    next_uses = _next_uses(trace) if policy == "min" else None
    cached: dict[Hashable, None] = {}  # insertion order = load order (infmoe)
    uses: dict[Hashable, int] = {}
    last: dict[Hashable, int] = {}
    next_use: dict[Hashable, int] = {}
    clock = hits = requests = 0
    for i, call in enumerate(trace):
        needed = set(call)
        done: set[Hashable] = set()
        # As OffloadedMoE does: the call's cached experts are taken (pinned) first, in order, then
        # the missing ones are loaded one after another.
        cached_now = [j for j, key in enumerate(call) if key in cached]
        missing = [j for j, key in enumerate(call) if key not in cached]
        hits += len(cached_now)
        requests += len(call)
        for j in cached_now + missing:
            key = call[j]
            clock += 1
            if key not in cached:
                if len(cached) >= slots:
                    candidates = [k for k in cached if k not in needed] or [k for k in cached if k in done] or list(cached)
                    cached.pop(_victim(policy, candidates, uses, last, next_use))
                cached[key] = None
            uses[key] = uses.get(key, 0) + 1
            last[key] = clock
            if next_uses is not None:
                next_use[key] = next_uses[i][j]
            done.add(key)
    return CacheResult(policy, slots, hits, requests)


def _victim(policy: str, candidates: list, uses: dict, last: dict, next_use: dict) -> Hashable:
    if policy == "min":
        return max(candidates, key=lambda k: (next_use[k], -last[k]))
    if policy == "lru":
        return min(candidates, key=lambda k: last[k])
    if policy == "lfu":
        return min(candidates, key=lambda k: (uses[k], last[k]))
    return candidates[0]  # infmoe: the earliest loaded (dicts keep insertion order)


def compare_policies(trace: Trace, units: int, fractions: Sequence[float] = (0.10, 0.25, 0.50)) -> list[dict]:
    """Every policy at slots = round(fraction * units) (at least 1), each with its hit rate and
    its share of MIN's hit rate."""
    rows = []
    for fraction in fractions:
        slots = max(1, round(fraction * units))
        results = {p: simulate(trace, slots, p) for p in POLICIES}
        ceiling = results["min"].hit_rate
        for p, r in results.items():
            rows.append({"fraction": fraction, "slots": slots, "policy": p, "hit_rate": round(r.hit_rate, 4),
                         "of_min": round(r.hit_rate / ceiling, 4) if ceiling else None})
    return rows


def prefetch_quality(predicted: Sequence[Sequence[Hashable]], actual: Sequence[Sequence[Hashable]]) -> dict:
    """Precision (guessed experts that were used) and recall (used experts that were guessed),
    summed over the calls: `predicted[i]` is the guess made for the call whose needs are `actual[i]`."""
    if len(predicted) != len(actual):
        raise ValueError(f"{len(predicted)} guesses for {len(actual)} calls")
    right = guessed = used = 0
    for guess, need in zip(predicted, actual):
        g, n = set(guess), set(need)
        right += len(g & n)
        guessed += len(g)
        used += len(n)
    return {"precision": right / guessed if guessed else None, "recall": right / used if used else None,
            "guessed": guessed, "used": used}


def expert_skew(trace: Trace) -> dict:
    """How unevenly experts are used: the share of requests that the most used 10% / 25% of the
    keys serve, and the normalised entropy of the use counts (1 = uniform)."""
    counts: dict[Hashable, int] = {}
    for call in trace:
        for key in call:
            counts[key] = counts.get(key, 0) + 1
    total = sum(counts.values())
    if not total:
        return {"keys": 0, "top10_share": None, "top25_share": None, "entropy": None}
    ordered = sorted(counts.values(), reverse=True)

    def share(fraction: float) -> float:
        return sum(ordered[: max(1, round(fraction * len(ordered)))]) / total

    entropy = -sum(c / total * math.log(c / total) for c in ordered)
    return {"keys": len(ordered), "top10_share": round(share(0.10), 4), "top25_share": round(share(0.25), 4),
            "entropy": round(entropy / math.log(len(ordered)), 4) if len(ordered) > 1 else 1.0}


def token_reuse(steps: Sequence[Sequence[Sequence[Hashable]]]) -> float | None:
    """Token-to-token reuse: over consecutive decode steps (each a list of layer calls), the share
    of a step's experts that the step before also used in the same layer call position."""
    same = total = 0
    for before, now in zip(steps, steps[1:]):
        for prev_call, call in zip(before, now):
            prev = set(prev_call)
            same += sum(1 for key in set(call) if key in prev)
            total += len(set(call))
    return same / total if total else None
