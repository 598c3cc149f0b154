"""int4 expert weights stored a second time in the layout the CPU's fused int4 matmul reads.

`torch._weight_int4pack_mm_for_cpu` does not read cpmctl.quant's nibble order: each weight must
first go through `torch._convert_weight_to_int4pack_for_cpu` (same size, nibbles reordered). A
resident model does that once per load; an offloaded one would do it on every cache miss, which
made int4 offload slower than fp32 offload. So `cpmctl quantize --experts int4` also writes,
beside the checkpoint:
    cpu_int4.safetensors   every expert qweight NAME.qweight [E, out, in / 2] uint8, repacked
    cpu_int4.json          what it is: the torch version that packed it, the file's sha256, the
                           CRC-32 of each expert block, and the CRC-32s of the qweights it was
                           made from (so a sidecar that does not belong to these weights is not used)
and the offload engine reads an expert's qweight from there: a miss is then a read, no repack.

The layout is torch's, not a file format anyone promises to keep, so before the sidecar is used
one expert is repacked with the running torch and compared with its stored form; on any
mismatch (or no sidecar, an older checkpoint) the engine repacks on read as before. The
sidecar is outside the checkpoint's provenance (like a task head); the checkpoint alone stays
complete and portable.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import torch

from cpmctl.checkpoint import LazyTensor, SafetensorsFile, write_safetensors
from cpmctl.quant import QuantizedView, cpu_int4_pack, cpu_kernels_available

LAYOUT_FILE = "cpu_int4.safetensors"
MANIFEST_FILE = "cpu_int4.json"
LAYOUT = "torch._convert_weight_to_int4pack_for_cpu(inner_k_tiles=1)"
# Part names of experts read from the sidecar: not "...qweight", so the engine does not repack them.
PREPACKED_SUFFIX = "[cpu_int4]"


def pack_stack(qweight: torch.Tensor, group_size: int) -> torch.Tensor:
    """uint8 [E, out, in / 2] in cpmctl.quant's order -> the CPU kernel's layout, expert by expert."""
    return torch.stack([cpu_int4_pack(QuantizedView("int4", group_size, q, q, q)) for q in qweight])


def write_cpu_int4_layout(directory: Path, ckpt, names: list[str], group_size: int) -> bool:
    """Write the sidecar and its manifest into `directory` (a checkpoint being written, inside its
    atomic directory) for the int4 qweights `names` of the open checkpoint `ckpt`. False (and
    nothing written) where this torch has no CPU int4 kernel."""
    if not cpu_kernels_available("int4"):
        return False
    tensors = {name: LazyTensor(torch.uint8, tuple(ckpt.tensor_info(name).shape),
                                lambda name=name: pack_stack(ckpt.get(name), group_size)) for name in names}
    written = write_safetensors(directory / LAYOUT_FILE, tensors, {"layout": LAYOUT})
    manifest = {"layout": LAYOUT, "torch": torch.__version__, "group_size": group_size, "file": LAYOUT_FILE,
                "sha256": written.sha256, "crc32": written.block_crc32,
                "source_crc32": {name: list(ckpt.tensor_crc(name) or ()) for name in names}}
    path = directory / MANIFEST_FILE
    with open(path, "w") as fh:
        json.dump(manifest, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    return True


def _usable_manifest(path: Path, ckpt, group_size: int) -> dict | None:
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("layout") != LAYOUT or manifest.get("group_size") != group_size:
        return None
    sources = manifest.get("source_crc32")
    if not isinstance(sources, dict) or not isinstance(manifest.get("crc32"), dict):
        return None
    for name, crcs in sources.items():  # made from exactly these weights
        try:
            recorded = ckpt.tensor_crc(name)
        except KeyError:
            return None
        if recorded is None or list(recorded) != crcs:
            return None
    return manifest


def prepacked_units(path, ckpt, units: list, group_size: int, source) -> list:
    """`units` with every expert qweight read from the sidecar (already in the CPU kernel's
    layout), when the checkpoint at `path` has a sidecar for these weights whose layout the running
    torch reproduces; else `units` unchanged (the engine then repacks on read). `source`: the
    engine's DiskSource, used for the one-expert check."""
    path = Path(path)
    manifest = _usable_manifest(path, ckpt, group_size) if cpu_kernels_available("int4") else None
    if manifest is None:
        return units
    try:
        sidecar = SafetensorsFile(path / manifest["file"],
                                  expected_crc={n: tuple(c) for n, c in manifest["crc32"].items()})
    except Exception:  # an unreadable sidecar is only a lost speed-up
        return units
    try:
        infos = {name: sidecar.info(name) for name in manifest["source_crc32"]}
    except KeyError:
        return units
    finally:
        sidecar.close()

    def substitute(part):
        info = infos.get(part.name)
        if info is None or tuple(info.shape[1:]) != tuple(part.shape) or info.dtype != part.stored_dtype:
            return None
        per_expert = info.nbytes // info.shape[0]
        block = (part.byte_offset - ckpt.tensor_info(part.name).byte_offset) // per_expert
        crcs = manifest["crc32"].get(part.name)
        expected = (crcs[block],) if isinstance(crcs, list) and len(crcs) == info.shape[0] else None
        return replace(part, name=part.name + PREPACKED_SUFFIX, file=info.file,
                       byte_offset=info.byte_offset + block * per_expert, expected_crc=expected)

    swapped = [[substitute(p) if p.name.endswith(".qweight") else None for p in u.parts] for u in units]
    if not any(s for row in swapped for s in row) or any(
            p.name.endswith(".qweight") and s is None for u, row in zip(units, swapped) for p, s in zip(u.parts, row)):
        return units
    # the check: one expert repacked now must equal its stored form
    unit, row = next((u, row) for u, row in zip(units, swapped) if any(row))
    original, packed = next((p, s) for p, s in zip(unit.parts, row) if s is not None)
    raw, stored = torch.empty(original.shape, dtype=torch.uint8), torch.empty(original.shape, dtype=torch.uint8)
    source.read_part(original, raw)
    source.read_part(packed, stored)
    if not torch.equal(cpu_int4_pack(QuantizedView("int4", group_size, raw, raw, raw)), stored):
        return units
    return [replace(u, parts=[s if s is not None else p for p, s in zip(u.parts, row)]) for u, row in zip(units, swapped)]
