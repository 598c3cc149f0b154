"""Training states on disk: `out/state/step-N/`, written atomically by rank 0 and read by every
rank, in cpmctl's own pickle-free format (safetensors + JSON). `cpmctl.training.Trainer` saves and
resumes through it; nothing here knows about the training loop.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from cpmctl.checkpoint import SafetensorsFile, write_safetensors
from cpmctl.errors import UserError
from cpmctl.fsutil import atomic_directory, verify_checksums, write_checksums

STATE_DIR = "state"
TRAINER_STATE_FILE = "trainer.json"

# -- training-state directories -------------------------------------------------------------------
def state_dirs(out: Path) -> list[Path]:
    """Complete training states in out/state, oldest first."""
    root = Path(out) / STATE_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / TRAINER_STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest_state(out: Path) -> Path | None:
    dirs = state_dirs(out)
    return dirs[-1] if dirs else None


# -- training states: our own pickle-free format ------------------------------------------------
# A state directory holds (all written by rank 0, read by every rank):
#   model.safetensors      the trainable parameters and the buffers (frozen weights come from the
#                          stage's own source again on resume, so a prompt-tuned 10B model does
#                          not cost 10B parameters per state)
#   optimizer.safetensors  per-parameter state tensors, named state.<param name>.<key>
#   optimizer.json         optimizer class, param groups (hyperparameters, parameter names) and
#                          non-tensor per-parameter entries
#   rng.safetensors        rank<r>.torch_cpu and rank<r>.torch_cuda.<i> generator states
#   rng.json               rank r's numpy and Python `random` states
#   trainer.json           step, data position, counters, best metric, loss scaler, config
# Nothing in it is a pickle: loading needs only json and cpmctl.checkpoint's safetensors reader.
# Tensors are always whole and named by the model's own parameter names (no DDP/FSDP prefixes):
# they go through torch.distributed.checkpoint's state-dict API, which gathers FSDP shards into
# full tensors on save and scatters them into each process's shards on load (and is a plain
# state_dict() on an unsharded model), so a state resumes under any number of processes, with or
# without FSDP.
STATE_FORMAT = 1
MODEL_STATE_FILE = "model.safetensors"
OPTIMIZER_TENSORS_FILE = "optimizer.safetensors"
OPTIMIZER_FILE = "optimizer.json"
RNG_TENSORS_FILE = "rng.safetensors"
RNG_FILE = "rng.json"
# Param-group entries that say how this process runs the update, not what the update is: the
# resuming process keeps its own (a state written with fused kernels resumes where there are none).
_IMPLEMENTATION_KEYS = ("fused", "foreach", "capturable", "differentiable")
# Name segments that wrappers insert (activation checkpointing, FSDP1, torch.compile); the state
# names parameters without them, as torch.distributed.checkpoint does.
_WRAPPER_SEGMENTS = frozenset({"_checkpoint_wrapped_module", "_fsdp_wrapped_module", "_orig_mod"})


def canonical_name(name: str) -> str:
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_SEGMENTS)


def _state_dict_options(**kw: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions  # +1.7 s at import (measured)

    return StateDictOptions(**kw)


def gather_model_state(model: nn.Module, *, frozen: bool) -> dict[str, Tensor]:
    """The model's state dict as whole CPU tensors on rank 0 ({} on the other ranks; every process
    must call it under FSDP, whose shards it gathers). `frozen=False` leaves out the parameters
    without gradients: what a training state stores (trainable parameters and buffers)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict  # +1.7 s at import (measured)

    options = _state_dict_options(full_state_dict=True, cpu_offload=True, ignore_frozen_params=not frozen)
    return {name: t.detach() for name, t in get_model_state_dict(model, options=options).items()}


def load_model_state(model: nn.Module, tensors: Mapping[str, Tensor], shapes: Mapping[str, tuple[int, ...]],
                     trainable: Sequence[str], where: Path) -> None:
    """Copy a state's whole model tensors into `model` (the prepared module: sharded under FSDP);
    every name and shape must match `shapes` (the unsharded model's state dict) and every name
    in `trainable` must be there."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict  # +1.7 s at import (measured)

    for name, tensor in tensors.items():
        if name not in shapes:
            raise UserError(f"training state {where} has a tensor {name} the model does not have; resume with the same model")
        if tuple(shapes[name]) != tuple(tensor.shape):
            raise UserError(f"training state {where}: {name} has shape {list(tensor.shape)}, the model {list(shapes[name])}")
    if missing := sorted(set(trainable) - set(tensors)):
        raise UserError(f"training state {where} lacks the trainable {missing[0]}; resume with the same trainable set")
    set_model_state_dict(model, dict(tensors), options=_state_dict_options(full_state_dict=True, strict=False))


def _group_entry(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, tuple):
        return list(value)
    return value


def gather_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state dict keyed by parameter names, whole CPU tensors, on rank 0 ({} on
    the others; collective under FSDP). `model` is the module the optimizer's parameters live in."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict  # +1.7 s at import (measured)

    return get_optimizer_state_dict(model, optimizer, options=_state_dict_options(full_state_dict=True, cpu_offload=True))


def optimizer_state(named: Mapping[str, Any], class_name: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors, JSON record) of a name-keyed optimizer state dict (`gather_optimizer_state`)."""
    tensors: dict[str, Tensor] = {}
    entries: dict[str, dict[str, Any]] = {}
    for name, per_param in named["state"].items():
        entries[name] = {}
        for key, value in per_param.items():
            if isinstance(value, Tensor):
                tensors[f"state.{name}.{key}"] = value.detach()
                entries[name][key] = {"tensor": f"state.{name}.{key}"}
            else:
                entries[name][key] = {"value": value}
    groups = [{**{k: _group_entry(v) for k, v in group.items() if k != "params"}, "params": list(group["params"])}
              for group in named["param_groups"]]
    return tensors, {"class": class_name, "param_groups": groups, "state": entries}


def optimizer_state_to_load(optimizer: torch.optim.Optimizer, live_names: Sequence[Sequence[str]], record: Mapping[str, Any],
                            tensors: Mapping[str, Tensor], where: Path) -> dict[str, Any]:
    """The name-keyed optimizer state dict of our record, for `set_optimizer_state_dict`; the
    parameter groups must hold the same parameters (by name, `live_names`) as when it was written."""
    if record.get("class") != type(optimizer).__name__:
        raise UserError(f"training state {where} was written by {record.get('class')}, this run uses "
                        f"{type(optimizer).__name__}; resume with the same optimizer")
    saved_groups = record["param_groups"]
    if [g["params"] for g in saved_groups] != [list(names) for names in live_names]:
        raise UserError(f"training state {where} trained other parameters than this run; resume with the same trainable set")
    groups = []
    for saved, live in zip(saved_groups, optimizer.param_groups):
        group = {}
        for key, value in saved.items():
            if key == "params":
                group[key] = list(value)
            elif key in _IMPLEMENTATION_KEYS and key in live:
                group[key] = live[key]
            elif isinstance(live.get(key), tuple):
                group[key] = tuple(value)
            elif isinstance(live.get(key), Tensor):
                group[key] = torch.tensor(value, dtype=live[key].dtype, device=live[key].device)
            else:
                group[key] = value
        groups.append(group)
    # Clones, so the optimizer never updates pages of the memory-mapped file in place.
    state = {name: {key: (tensors[entry["tensor"]].clone() if "tensor" in entry else entry["value"])
                    for key, entry in entries.items()}
             for name, entries in record["state"].items()}
    return {"state": state, "param_groups": groups}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, named: Mapping[str, Any]) -> None:
    """Load a name-keyed, whole-tensor optimizer state dict (every process passes all of it; under
    FSDP each keeps its shards)."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict  # +1.7 s at import (measured)

    # strict=False: a trainable parameter that never got a gradient (e.g. an unused head) has no
    # optimizer state yet, exactly as in the run that wrote it; the groups were checked by name.
    set_optimizer_state_dict(model, optimizer, dict(named), options=_state_dict_options(full_state_dict=True, strict=False))


def rng_state() -> tuple[dict[str, Tensor], dict[str, Any]]:
    """This process's generator states: (torch tensors, numpy and Python `random` as JSON)."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda.{i}"] = s
    version, internal, gauss = random.getstate()
    kind, key, pos, has_gauss, cached = np.random.get_state()
    return tensors, {"python": {"version": version, "state": list(internal), "gauss_next": gauss},
                     "numpy": {"bit_generator": kind, "key": [int(k) for k in key], "pos": int(pos),
                               "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}


def set_rng_state(tensors: Mapping[str, Tensor], record: Mapping[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"].clone())
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            if f"torch_cuda.{i}" in tensors:
                torch.cuda.set_rng_state(tensors[f"torch_cuda.{i}"].clone(), i)
    py = record["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    npy = record["numpy"]
    np.random.set_state((npy["bit_generator"], np.array(npy["key"], dtype=np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached_gaussian"]))


def pack(tensors: Mapping[str, Tensor], record: Any) -> bytes:
    """One process's RNG state as bytes for the gather to rank 0: a JSON header, then the raw
    bytes of the uint8 generator states."""
    blobs = {name: t.cpu().contiguous().view(torch.uint8).numpy().tobytes() for name, t in tensors.items()}
    header = json.dumps({"record": record, "sizes": {name: len(b) for name, b in blobs.items()}}).encode()
    return len(header).to_bytes(8, "little") + header + b"".join(blobs.values())


def unpack(data: bytes) -> tuple[dict[str, Tensor], Any]:
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    tensors, at = {}, 8 + size
    for name, n in header["sizes"].items():
        tensors[name] = torch.frombuffer(bytearray(data[at:at + n]), dtype=torch.uint8)
        at += n
    return tensors, header["record"]


def all_gather_bytes(data: bytes, world: int, device: torch.device) -> list[bytes]:
    """Every process's `data` (collective: all processes call it), through tensors on `device`."""
    if world == 1:
        return [data]
    import torch.distributed as dist  # here: only multi-process runs need it

    length = torch.tensor([len(data)], dtype=torch.int64, device=device)
    lengths = [torch.zeros_like(length) for _ in range(world)]
    dist.all_gather(lengths, length)
    sizes = [int(n) for n in lengths]
    padded = torch.zeros(max(sizes), dtype=torch.uint8, device=device)
    padded[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return [g[:n].cpu().numpy().tobytes() for g, n in zip(gathered, sizes)]


def inner_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def read_safetensors(path: Path) -> dict[str, Tensor]:
    with SafetensorsFile(path) as fh:
        return fh.state_dict()



def write_state(root: Path, step: int, *, model_tensors: Mapping[str, Tensor], optimizer: torch.optim.Optimizer,
                optimizer_named: Mapping[str, Any], rng: Sequence[bytes], record: dict[str, Any]) -> Path:
    """Rank 0's part of a save: root/step-N written atomically (a temporary sibling renamed into
    place) from the gathered model and optimizer state and every rank's packed RNG state;
    leftovers of a process killed while writing are removed first."""
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.iterdir():
        if stale.name.startswith(".") and (".tmp-" in stale.name or ".old-" in stale.name):
            shutil.rmtree(stale, ignore_errors=True)
    optim_tensors, optim_record = optimizer_state(optimizer_named, type(optimizer).__name__)
    rng_tensors, rng_records = {}, []
    for rank, data in enumerate(rng):
        tensors, rng_record = unpack(data)
        rng_tensors.update({f"rank{rank}.{name}": t for name, t in tensors.items()})
        rng_records.append(rng_record)
    target = root / f"step-{step:08d}"
    with atomic_directory(target, overwrite=True) as tmp:
        write_safetensors(tmp / MODEL_STATE_FILE, model_tensors)
        write_safetensors(tmp / OPTIMIZER_TENSORS_FILE, optim_tensors)
        (tmp / OPTIMIZER_FILE).write_text(json.dumps(optim_record, indent=1) + "\n")
        write_safetensors(tmp / RNG_TENSORS_FILE, rng_tensors)
        (tmp / RNG_FILE).write_text(json.dumps({"ranks": rng_records}) + "\n")
        (tmp / TRAINER_STATE_FILE).write_text(json.dumps(record, indent=2) + "\n")
        # The tensors' CRC-32s are in their files' headers; the JSON files get theirs here.
        write_checksums(tmp, [OPTIMIZER_FILE, RNG_FILE, TRAINER_STATE_FILE])
    return target


def read_trainer_record(where: Path) -> dict[str, Any]:
    """trainer.json of a state directory, refused unless it is in this cpmctl's format and its
    files match their recorded checksums."""
    verify_checksums(where, "training state")
    try:
        saved = json.loads((where / TRAINER_STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"training state {where}: {TRAINER_STATE_FILE} is unreadable ({exc}); the state is damaged, "
                        "resume from an earlier one (delete this step directory) or start over") from None
    if not isinstance(saved, dict):
        raise UserError(f"training state {where}: {TRAINER_STATE_FILE} is not a JSON object; the state is damaged")
    for key, kinds in (("step", int), ("tokens", int), ("flops", (int, float)), ("train_seconds", (int, float)),
                       ("bad_evals", int), ("data", dict)):
        value = saved.get(key)
        if key in saved and (not isinstance(value, kinds) or isinstance(value, bool)):
            raise UserError(f"training state {where}: {TRAINER_STATE_FILE} field {key} expects "
                            f"{'an integer' if kinds is int else 'a table' if kinds is dict else 'a number'}, got {value!r}")
    if saved.get("format") != STATE_FORMAT or not (where / MODEL_STATE_FILE).is_file():
        raise UserError(f"training state {where} is not in this cpmctl's format (an older, pickle-based one?); "
                        "start the run over")
    return saved


def rank_rng_state(where: Path, rank: int) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The RNG state rank `rank` resumes with: under another number of processes than the
    state's, rank r takes rank r mod W's state."""
    ranks = json.loads((where / RNG_FILE).read_text())["ranks"]
    source = rank % len(ranks)
    prefix = f"rank{source}."
    tensors = {k[len(prefix):]: t for k, t in read_safetensors(where / RNG_TENSORS_FILE).items() if k.startswith(prefix)}
    return tensors, ranks[source]

