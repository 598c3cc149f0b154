"""Reading a Hugging Face model directory: config.json and the weights, lazily.

safetensors files (single or sharded with an index) are opened with the `safetensors` package's
`safe_open`: tensors are memory-mapped views, read from disk only when their bytes are used, in
their stored dtype. Each tensor is read through a handle of its own: one handle maps its whole
file once and every page a view touches stays resident while the handle lives, so a shared handle
would grow to the whole file as a conversion walks through it; a tensor's own map goes with it.
pytorch_model.bin files (single or sharded) are loaded with `torch.load(weights_only=True,
mmap=True)`, which refuses pickled objects other than tensors; each file stays mapped (and its
touched pages resident) until `close()`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from cpmctl.errors import UserError

HF_CONFIG = "config.json"
HF_SAFETENSORS = "model.safetensors"
HF_SAFETENSORS_INDEX = "model.safetensors.index.json"
HF_BIN = "pytorch_model.bin"
HF_BIN_INDEX = "pytorch_model.bin.index.json"

# safetensors' dtype codes, as safe_open's slices name them.
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
}


def resolve_source(src) -> Path:
    """The model directory: `src` itself, or the snapshot of a Hugging Face cache entry."""
    path = Path(src)
    if not path.exists():
        raise UserError(f"{path} does not exist")
    if not path.is_dir():
        raise UserError(f"{path} is not a directory (expected a Hugging Face model directory with config.json)")
    if (path / HF_CONFIG).is_file():
        return path
    snapshots = path / "snapshots"
    if snapshots.is_dir():
        ref = path / "refs" / "main"
        if ref.is_file() and (snapshots / ref.read_text().strip() / HF_CONFIG).is_file():
            return snapshots / ref.read_text().strip()
        candidates = [d for d in snapshots.iterdir() if (d / HF_CONFIG).is_file()]
        if len(candidates) == 1:
            return candidates[0]
    raise UserError(f"{path} has no config.json; is it a Hugging Face model directory?")


def read_hf_config(src) -> dict[str, Any]:
    path = Path(src) / HF_CONFIG
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{src} has no config.json; is it a Hugging Face model directory?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a JSON object")
    return data


class HFWeights(Mapping[str, torch.Tensor]):
    """The tensors of a Hugging Face model directory by name, each read when first asked for.

    `shape(name)` and `dtype(name)` answer from the file headers without reading any tensor data.
    """

    def __init__(self, src: Path):
        self.src = src
        self._getters: dict[str, Callable[[], torch.Tensor]] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        if (src / HF_SAFETENSORS).is_file():
            self._add_safetensors(src / HF_SAFETENSORS)
            self.kind = HF_SAFETENSORS
        elif (src / HF_SAFETENSORS_INDEX).is_file():
            for shard, names in self._index_shards(src / HF_SAFETENSORS_INDEX).items():
                self._add_safetensors(shard, names)
            self.kind = HF_SAFETENSORS_INDEX
        elif (src / HF_BIN).is_file():
            self._add_bin(src / HF_BIN)
            self.kind = HF_BIN
        elif (src / HF_BIN_INDEX).is_file():
            for shard, names in self._index_shards(src / HF_BIN_INDEX).items():
                self._add_bin(shard, names)
            self.kind = HF_BIN_INDEX
        else:
            raise UserError(f"{src} has no weights ({HF_SAFETENSORS}, {HF_SAFETENSORS_INDEX}, {HF_BIN} or {HF_BIN_INDEX})")

    def _index_shards(self, index_path: Path) -> dict[Path, list[str]]:
        """Shard file -> the tensor names the index places in it; every shard must exist."""
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"{index_path} is not valid JSON ({exc})") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise UserError(f"{index_path} has no valid weight_map (tensor name -> shard file)")
        shards: dict[Path, list[str]] = {}
        for name, filename in sorted(weight_map.items(), key=lambda kv: (kv[1], kv[0])):
            if Path(filename).name != filename or filename in (".", ".."):
                raise UserError(f"{index_path} names an invalid shard file {filename!r}")
            if not (self.src / filename).is_file():
                raise UserError(f"{index_path} names shard {filename}, which is missing")
            shards.setdefault(self.src / filename, []).append(name)
        return shards

    def _add_safetensors(self, path: Path, names: list[str] | None = None) -> None:
        from safetensors import safe_open

        try:
            handle = safe_open(str(path), framework="pt")
        except Exception as exc:  # a truncated or corrupt header
            raise UserError(f"cannot read {path} as safetensors ({type(exc).__name__}: {exc})") from None
        present = set(handle.keys())
        for name in names if names is not None else sorted(present):
            if name not in present:
                raise UserError(f"{self.src / HF_SAFETENSORS_INDEX} places tensor {name} in {path.name}, which lacks it")
            info = handle.get_slice(name)
            code = info.get_dtype()
            if code not in _SAFETENSORS_DTYPES:
                raise UserError(f"{path.name}: tensor {name} has dtype {code}, which cpmctl cannot read")
            self._shapes[name] = tuple(info.get_shape())
            self._dtypes[name] = _SAFETENSORS_DTYPES[code]
            self._getters[name] = lambda path=path, name=name: _read_safetensor(path, name)

    def _add_bin(self, path: Path, names: list[str] | None = None) -> None:
        try:
            try:
                data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                data = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
        except Exception as exc:  # weights_only refuses pickled objects other than tensors
            raise UserError(f"cannot read {path} safely as tensors ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
        if not isinstance(data, dict):
            raise UserError(f"{path} does not hold a state dict")
        for name in names or []:
            if not isinstance(data.get(name), torch.Tensor):
                raise UserError(f"{self.src / HF_BIN_INDEX} places tensor {name} in {path.name}, which lacks it")
        for name, value in data.items():
            if isinstance(value, torch.Tensor):
                self._shapes[name] = tuple(value.shape)
                self._dtypes[name] = value.dtype
                self._getters[name] = lambda value=value: value

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def dtype(self, name: str) -> torch.dtype:
        return self._dtypes[name]

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._getters[name]()

    def __contains__(self, name: object) -> bool:
        return name in self._getters

    def __iter__(self) -> Iterator[str]:
        return iter(self._getters)

    def __len__(self) -> int:
        return len(self._getters)

    def close(self) -> None:
        # Drops the loaded pytorch_model.bin maps (safetensors tensors carry their own); views
        # handed out stay valid, a map goes with the last of them.
        self._getters.clear()


def _read_safetensor(path: Path, name: str) -> torch.Tensor:
    """One tensor through a fresh safe_open handle, so its memory map lives only as long as it."""
    from safetensors import safe_open

    return safe_open(str(path), framework="pt").get_tensor(name)
