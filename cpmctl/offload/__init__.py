"""Inference under a memory budget: weights that do not fit stay in host memory or on disk and are
streamed in as the forward pass needs them (`cpmctl infer --offload cpu|disk --memory-budget`).

    cpmctl infer ./moe-ckpt "text" --offload disk --memory-budget 25% --json

What stays resident: every weight except the experts of routed MoE layers (MoE models) or except
the transformer blocks (dense models), read into memory of its own (pread, checked). Then as many
units (experts, or blocks) as fit the rest of the budget: they live in a cache of equal slots on
the device, one slot per unit, each unit packed so that a move is one contiguous copy into its
slot (from pinned host memory with --offload cpu; with --offload disk, pread from the files,
which on a CPU measured 2-3x cheaper per megabyte than mapping the pages in and dropping them
again). What does not fit is loaded when needed:

- MoE layers (`OffloadedMoE`, InfMoE's scheme, see ../shared/REFERENCES.md): the layer routes its
  tokens, then computes the experts that are already in the cache first while a loader thread
  brings the missing ones in (a copy stream on CUDA), in an order (`infmoe_order`) that hides
  each load behind the compute before it, from compute and load times measured at start-up.
  While it computes, the next MoE layer's router is applied to the current hidden state and its
  likely experts are prefetched, for as long as those guesses are mostly right
  (`OffloadEngine.should_prefetch`). Slots are evicted least-frequently-used first (ties: least
  recently used): an LRU cache smaller than the experts a token needs misses on every access,
  because layers are visited in a cycle; counting uses keeps the popular experts.
- dense blocks (`StreamedBlock`): loaded layer by layer, the next streamed block loading while the
  current one computes.

Correctness: experts and blocks compute with the same functions as the resident model
(`cpmctl.moe.expert_output`, `combine_pairs`; the block's own forward on its loaded weights), so
outputs equal the resident model's bit for bit. Every piece read from disk is checked once against
the CRC-32s the checkpoint writer recorded (`tensor_crc32` in cpmctl.json); a short read, a
checksum mismatch or a loader that died is an `OffloadError` (a UserError: one line, exit 2),
never a wrong output.

One job per module: `reader` (pieces of stored tensors, pread and CRC checks), `cache` (the slots
and their loader thread), `plan` (budget arithmetic on shapes, shared with the dry run), `engine`
(the modules swapped into the model, the compute order, `load_offloaded`).
"""

from cpmctl.offload.cache import CopySlots, UnitCache
from cpmctl.offload.engine import (OffloadedMoE, OffloadEngine, StreamedBlock, bind_units, checkpoint_weight_bytes, infmoe_order,
                                   load_offloaded)
from cpmctl.offload.plan import (OFFLOAD_MODES, OffloadPlan, SlotArithmetic, StoredTensor, check_offload_device,
                                 offload_run_dtype, offload_units, part_alignment, plan_offload, run_weight_bytes,
                                 slot_arithmetic, staging_bytes, stored_tensors)
from cpmctl.offload.reader import ALIGN_BYTES, DiskSource, OffloadError, Part, Unit, make_part, resident_copy

__all__ = [
    "ALIGN_BYTES", "CopySlots", "DiskSource", "OFFLOAD_MODES", "OffloadEngine", "OffloadError", "OffloadPlan",
    "OffloadedMoE", "Part", "SlotArithmetic", "StoredTensor", "StreamedBlock", "Unit", "UnitCache", "bind_units",
    "check_offload_device", "checkpoint_weight_bytes", "infmoe_order", "load_offloaded", "make_part", "offload_run_dtype", "offload_units",
    "part_alignment", "plan_offload", "resident_copy", "run_weight_bytes", "slot_arithmetic", "staging_bytes",
    "stored_tensors",
]
