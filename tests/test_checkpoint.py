"""Checkpoint storage: our safetensors writer and reader, sharding, hashing, atomicity, validation."""

from __future__ import annotations

import functools
import hashlib
import json
import weakref
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cpmctl.checkpoint import (
    INDEX_FILE,
    WEIGHTS_FILE,
    LazyTensor,
    check_state_dict_matches,
    content_hash,
    open_checkpoint,
    read_config,
    read_provenance,
    save_checkpoint,
    verify_checkpoint,
    write_safetensors,
)
from cpmctl.config import ModelConfig
from cpmctl.errors import UserError

ALL_DTYPES = [
    torch.float32, torch.float16, torch.bfloat16, torch.float64,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
]


@pytest.fixture
def config() -> ModelConfig:
    return ModelConfig.from_preset("t5-tiny")


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * 100).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=gen, dtype=torch.int64).to(dtype)


def mixed_state_dict() -> dict[str, torch.Tensor]:
    """Every dtype, with odd, 0-d and zero-size shapes, named so that sorting interleaves dtypes."""
    tensors = {}
    for i, dtype in enumerate(ALL_DTYPES):
        tag = str(dtype).removeprefix("torch.")
        tensors[f"a.{tag}.odd"] = random_tensor((3, 5, 7), dtype, seed=i)
        tensors[f"b.{tag}.scalar"] = random_tensor((), dtype, seed=100 + i)
        tensors[f"c.{tag}.empty"] = random_tensor((0, 4), dtype, seed=200 + i)
        tensors[f"d.{tag}.row"] = random_tensor((13,), dtype, seed=300 + i)
    return tensors


def bits(t: torch.Tensor) -> bytes:
    """Raw bytes, so NaN payloads and -0.0 must match exactly."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_bit_exact(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert tuple(a[name].shape) == tuple(b[name].shape), name
        assert bits(a[name]) == bits(b[name]), name


# --------------------------------------------------------------------------------------------
# Writer and reader round trips
# --------------------------------------------------------------------------------------------


def test_every_dtype_round_trips_bit_exact_through_both_readers(tmp_path, config):
    tensors = mixed_state_dict()
    tensors["nan.payload"] = torch.tensor([float("nan"), -0.0, float("inf")], dtype=torch.float32)
    save_checkpoint(tmp_path / "ck", config, tensors)
    weights = tmp_path / "ck" / WEIGHTS_FILE

    with open_checkpoint(tmp_path / "ck") as ck:
        assert_bit_exact(tensors, ck.state_dict())
        assert ck.config == config
    assert_bit_exact(tensors, load_file(weights))
    with safe_open(weights, framework="pt") as fh:
        assert fh.metadata() == {"format": "pt"}
        assert_bit_exact(tensors, {name: fh.get_tensor(name) for name in fh.keys()})


def test_writer_matches_official_reader_on_non_contiguous_and_tied_tensors(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tensors = {
        "transposed": base.t(),  # non-contiguous
        "strided": base[:, ::2],
        "tied.a": base,
        "tied.b": base,  # same storage, stored once per name
        "slice": base[1:3],  # storage offset
        "needs_grad": torch.nn.Parameter(torch.ones(2, 2)),
    }
    written = write_safetensors(tmp_path / "x.safetensors", tensors)
    loaded = load_file(tmp_path / "x.safetensors")
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor.detach()), name
    assert written.sha256 == hashlib.sha256((tmp_path / "x.safetensors").read_bytes()).hexdigest()
    assert written.size == (tmp_path / "x.safetensors").stat().st_size


def test_reader_reads_files_from_the_official_writer(tmp_path, config):
    tensors = mixed_state_dict()
    tensors = {k: v for k, v in tensors.items() if v.numel() > 0}  # keep the official writer simple
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "config.json").write_text(config.to_json())
    save_file(tensors, tmp_path / "ck" / WEIGHTS_FILE)
    with open_checkpoint(tmp_path / "ck") as ck:
        assert ck.provenance == {}
        assert_bit_exact(tensors, ck.state_dict())


def test_views_are_aligned_even_with_mixed_dtypes(tmp_path, config):
    save_checkpoint(tmp_path / "ck", config, mixed_state_dict())
    with open_checkpoint(tmp_path / "ck") as ck:
        for name in ck.tensor_names():
            info = ck.tensor_info(name)
            assert info.byte_offset % ck.get(name).element_size() == 0, name


def test_meta_and_unsupported_tensors_are_refused_before_writing(tmp_path, config):
    with pytest.raises(ValueError, match="meta device"):
        save_checkpoint(tmp_path / "m", config, {"w": torch.empty(2, device="meta")})
    with pytest.raises(ValueError, match="complex64 is not supported"):
        save_checkpoint(tmp_path / "c", config, {"w": torch.zeros(2, dtype=torch.complex64)})
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# Sharding and content hash
# --------------------------------------------------------------------------------------------


def layer_state_dict() -> dict[str, torch.Tensor]:
    return {f"blocks.{i}.w": random_tensor((16, 16), torch.float32, seed=i) for i in range(6)} | {
        "embed": random_tensor((40, 16), torch.bfloat16, seed=99),
        "big": random_tensor((64, 64), torch.float32, seed=7),  # 16 KiB, above the shard limit
    }


def test_sharded_checkpoint_reads_back_equal_and_follows_hf_layout(tmp_path, config):
    tensors = layer_state_dict()
    prov = save_checkpoint(tmp_path / "ck", config, tensors, max_shard_bytes=2048)
    out = tmp_path / "ck"
    assert not (out / WEIGHTS_FILE).exists()
    index = json.loads((out / INDEX_FILE).read_text())
    shards = sorted({*index["weight_map"].values()})
    # Greedy in name order with 1 KiB tensors and a 2 KiB limit: big | blocks.0-1 | 2-3 | 4-5 | embed
    assert shards == [f"model-{i:05d}-of-00005.safetensors" for i in range(1, 6)]
    assert index["weight_map"]["big"] == shards[0]
    assert index["weight_map"]["blocks.0.w"] == index["weight_map"]["blocks.1.w"] == shards[1]
    assert index["weight_map"]["embed"] == shards[4]
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert set(prov["files"]) >= set(shards) | {INDEX_FILE, "config.json"}
    for shard in shards:  # each shard is a valid file on its own for the official reader
        for name, tensor in load_file(out / shard).items():
            assert index["weight_map"][name] == shard
            assert torch.equal(tensor, tensors[name])
    with open_checkpoint(out) as ck:
        assert_bit_exact(tensors, ck.state_dict())
        assert ck.tensor_info("embed").file == out / shards[4]


def test_content_hash_ignores_sharding_but_sees_one_byte(tmp_path, config):
    tensors = layer_state_dict()
    whole = save_checkpoint(tmp_path / "whole", config, tensors)
    sharded = save_checkpoint(tmp_path / "sharded", config, tensors, max_shard_bytes=2048)
    assert whole["content_hash"] == sharded["content_hash"]
    assert whole["content_hash"].startswith("sha256:") and len(whole["content_hash"]) == 7 + 64
    assert content_hash(tensors) == whole["content_hash"]
    with open_checkpoint(tmp_path / "sharded") as ck:
        assert content_hash(ck.state_dict()) == whole["content_hash"]

    changed = dict(tensors)
    changed["blocks.3.w"] = tensors["blocks.3.w"].clone()
    changed["blocks.3.w"].view(torch.uint8).view(-1)[5] ^= 1
    assert content_hash(changed) != whole["content_hash"]
    # Same bytes under another dtype or shape are different content.
    reshaped = dict(tensors, big=tensors["big"].reshape(32, 128))
    assert content_hash(reshaped) != whole["content_hash"]
    retyped = dict(tensors, big=tensors["big"].view(torch.int32))
    assert content_hash(retyped) != whole["content_hash"]


class LiveCount:
    """Producers that hand out clones of `tensors` and count how many of those are alive."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors, self.alive, self.peak, self.made = tensors, set(), 0, []

    def produce(self, name: str) -> torch.Tensor:
        tensor = self.tensors[name].clone()
        key = id(tensor.untyped_storage())
        self.alive.add(key)
        weakref.finalize(tensor.untyped_storage(), self.alive.discard, key)
        self.peak = max(self.peak, len(self.alive))
        self.made.append(name)
        return tensor

    def lazy(self) -> dict[str, LazyTensor]:
        return {name: LazyTensor(t.dtype, tuple(t.shape), functools.partial(self.produce, name))
                for name, t in self.tensors.items()}


def test_lazy_tensors_are_written_one_at_a_time_to_the_same_bytes(tmp_path, config):
    tensors = layer_state_dict()
    tensors["blocks.0.w"] = tensors["blocks.0.w"].t()  # a non-contiguous product is written too
    eager = save_checkpoint(tmp_path / "eager", config, tensors, max_shard_bytes=2048)
    counter = LiveCount(tensors)
    lazy = save_checkpoint(tmp_path / "lazy", config, counter.lazy(), max_shard_bytes=2048)
    # Each producer ran once, and its tensor was gone before the next one was made.
    assert sorted(counter.made) == sorted(tensors) and counter.peak == 1 and not counter.alive
    for key in ("content_hash", "files", "tensor_crc32", "dtype", "num_parameters"):
        assert lazy[key] == eager[key]
    assert content_hash(LiveCount(tensors).lazy()) == eager["content_hash"]
    single = LiveCount(tensors)
    write_safetensors(tmp_path / "one.safetensors", single.lazy())
    assert single.peak == 1
    assert_bit_exact(tensors, load_file(tmp_path / "one.safetensors"))


def test_a_producer_that_breaks_its_promise_leaves_nothing_behind(tmp_path, config):
    tensors = {"a": torch.ones(4, 2), "b": torch.zeros(3)}
    lying = {"a": tensors["a"], "b": LazyTensor(torch.float32, (4,), lambda: tensors["b"])}
    with pytest.raises(RuntimeError, match=r"the producer of b made float32 \[3\], it promised float32 \[4\]"):
        save_checkpoint(tmp_path / "ck", config, lying)
    wrong_dtype = {"b": LazyTensor(torch.bfloat16, (3,), lambda: tensors["b"])}
    with pytest.raises(RuntimeError, match="promised bfloat16"):
        save_checkpoint(tmp_path / "ck", config, wrong_dtype)
    with pytest.raises(ValueError, match="dtype complex64 is not supported"):
        save_checkpoint(tmp_path / "ck", config, {"c": LazyTensor(torch.complex64, (2,), lambda: tensors["b"])})
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# Memory-mapped views
# --------------------------------------------------------------------------------------------


def test_views_live_inside_the_file_mapping_and_are_copy_on_write(tmp_path, config):
    tensors = {"w": torch.arange(4096, dtype=torch.float32).reshape(64, 64), "b": torch.ones(3)}
    save_checkpoint(tmp_path / "ck", config, tensors)
    weights = tmp_path / "ck" / WEIGHTS_FILE
    before = weights.read_bytes()
    with open_checkpoint(tmp_path / "ck") as ck:
        info = ck.tensor_info("w")
        view = ck.get("w")
        start, length = ck.file_of("w").mapping_address()
        # No fresh allocation: the tensor's memory is the map's, at the tensor's file offset.
        assert view.data_ptr() == start + info.byte_offset
        assert view.untyped_storage().data_ptr() == start + info.byte_offset
        assert info.byte_offset + info.nbytes <= length
        # A second get is another view on the same pages, not a copy.
        assert ck.get("w").data_ptr() == view.data_ptr()
        view[0, 0] = -1.0
        assert ck.get("w")[0, 0].item() == -1.0  # same private pages within this process
    assert weights.read_bytes() == before  # ...but never written back to the file
    with open_checkpoint(tmp_path / "ck") as ck:
        assert ck.get("w")[0, 0].item() == 0.0
    assert view[0, 0].item() == -1.0  # views outlive close()


def test_checkpoint_reports_sizes_and_dtypes(tmp_path, config):
    tensors = {"w": torch.zeros(10, 3), "e": torch.zeros(7, dtype=torch.bfloat16), "i": torch.zeros(2, dtype=torch.int64)}
    prov = save_checkpoint(tmp_path / "ck", config, tensors)
    with open_checkpoint(tmp_path / "ck") as ck:
        assert ck.tensor_names() == ["e", "i", "w"]
        assert ck.dtype_summary() == {"bfloat16": 7, "float32": 30, "int64": 2}
        assert ck.shapes() == {"e": (7,), "i": (2,), "w": (10, 3)}
        dtype, shape, file, offset, nbytes = ck.tensor_info("w")
        assert (dtype, shape, file, nbytes) == (torch.float32, (10, 3), tmp_path / "ck" / WEIGHTS_FILE, 120)
        raw = file.read_bytes()[offset : offset + nbytes]
        assert raw == bits(tensors["w"])
        assert ck.size_on_disk() == sum(p.stat().st_size for p in (tmp_path / "ck").iterdir())
        assert "w" in ck and "x" not in ck
        with pytest.raises(KeyError, match="no tensor 'x'"):
            ck.get("x")
    assert prov["num_parameters"] == 39 and prov["dtype"] == "float32"


# --------------------------------------------------------------------------------------------
# Atomicity and provenance
# --------------------------------------------------------------------------------------------


class ExplodingTensor(torch.Tensor):
    """A tensor whose data cannot be read: simulates a failure half-way through the weights."""

    def detach(self):
        raise RuntimeError("disk full")


def test_failed_write_leaves_nothing_behind(tmp_path, config):
    bad = torch.zeros(4).as_subclass(ExplodingTensor)
    tensors = {"a": torch.ones(100), "z": bad}  # "a" is written first, then "z" fails
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(tmp_path / "ck", config, tensors)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_refused_unless_overwrite(tmp_path, config):
    save_checkpoint(tmp_path / "ck", config, {"w": torch.zeros(2)})
    with pytest.raises(UserError, match="already exists"):
        save_checkpoint(tmp_path / "ck", config, {"w": torch.ones(2)})
    with open_checkpoint(tmp_path / "ck") as ck:
        assert ck.get("w").tolist() == [0.0, 0.0]
    save_checkpoint(tmp_path / "ck", config, {"v": torch.ones(3)}, overwrite=True)
    with open_checkpoint(tmp_path / "ck") as ck:
        assert ck.tensor_names() == ["v"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    # A failing overwrite keeps the old checkpoint whole.
    with pytest.raises(RuntimeError):
        save_checkpoint(tmp_path / "ck", config, {"z": torch.zeros(1).as_subclass(ExplodingTensor)}, overwrite=True)
    with open_checkpoint(tmp_path / "ck") as ck:
        assert ck.tensor_names() == ["v"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_provenance_records_parents_options_tokenizer_and_files(tmp_path, config):
    p1 = save_checkpoint(tmp_path / "p1", config, {"w": torch.zeros(2)}, stage="convert")
    p2 = save_checkpoint(tmp_path / "p2", config, {"w": torch.ones(2)}, stage="pretrain")
    tok = tmp_path / "tok"
    (tok / "sub").mkdir(parents=True)
    (tok / "vocab.txt").write_text("a\nb\n")
    (tok / "sub" / "extra.json").write_text("{}")
    prov = save_checkpoint(
        tmp_path / "child", config, {"w": torch.full((2,), 2.0)}, stage="distill",
        parents=[tmp_path / "p1", tmp_path / "p2"], options={"temperature": 2.0}, metrics={"loss": 0.5},
        tokenizer_dir=tok,
    )
    assert prov == read_provenance(tmp_path / "child")
    assert prov["stage"] == "distill"
    assert prov["parents"] == [
        {"path": str((tmp_path / "p1").resolve()), "content_hash": p1["content_hash"], "verified": True},
        {"path": str((tmp_path / "p2").resolve()), "content_hash": p2["content_hash"], "verified": True},
    ]
    assert p1["content_hash"] != p2["content_hash"]
    assert prov["options"] == {"temperature": 2.0} and prov["metrics"] == {"loss": 0.5}
    assert prov["created"].endswith("Z") and prov["cpmctl_version"]
    assert (tmp_path / "child" / "tokenizer" / "sub" / "extra.json").read_text() == "{}"
    child = tmp_path / "child"
    assert set(prov["files"]) == {"config.json", WEIGHTS_FILE, "tokenizer/vocab.txt", "tokenizer/sub/extra.json"}
    for rel, digest in prov["files"].items():
        assert hashlib.sha256((child / rel).read_bytes()).hexdigest() == digest
    assert read_config(child) == config


def test_parent_that_is_not_a_checkpoint_is_refused(tmp_path, config):
    (tmp_path / "plain").mkdir()
    with pytest.raises(UserError, match="parent .*plain is not a cpmctl checkpoint"):
        save_checkpoint(tmp_path / "ck", config, {"w": torch.zeros(1)}, parents=[tmp_path / "plain"])
    with pytest.raises(UserError, match="tokenizer directory"):
        save_checkpoint(tmp_path / "ck", config, {"w": torch.zeros(1)}, tokenizer_dir=tmp_path / "nope")
    assert not (tmp_path / "ck").exists()


def test_verify_catches_one_flipped_byte(tmp_path, config):
    save_checkpoint(tmp_path / "ck", config, layer_state_dict(), max_shard_bytes=2048)
    assert verify_checkpoint(tmp_path / "ck")["stage"] == "unknown"
    shard = tmp_path / "ck" / "model-00003-of-00005.safetensors"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0x01  # inside tensor data: the header still parses
    shard.write_bytes(bytes(data))
    with pytest.raises(UserError, match="checksum mismatch in model-00003-of-00005.safetensors"):
        verify_checkpoint(tmp_path / "ck")
    (tmp_path / "ck" / "config.json").unlink()
    with pytest.raises(UserError, match="missing config.json"):
        verify_checkpoint(tmp_path / "ck")


# --------------------------------------------------------------------------------------------
# Validation: one UserError line per kind of damage
# --------------------------------------------------------------------------------------------


def make_ck(tmp_path: Path, config: ModelConfig, **kw) -> Path:
    out = tmp_path / "ck"
    save_checkpoint(out, config, {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4)}, **kw)
    return out


def rewrite_header(path: Path, edit) -> None:
    """Replace a safetensors file's header with edit(header), keeping the data bytes."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    new = json.dumps(edit(header)).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n :])


def test_missing_paths_and_configs(tmp_path, config):
    with pytest.raises(UserError, match="does not exist"):
        open_checkpoint(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is not a directory"):
        open_checkpoint(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no config.json"):
        open_checkpoint(tmp_path / "empty")
    out = make_ck(tmp_path, config)
    (out / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="config .*config.json is not valid JSON"):
        read_config(out)
    (out / "config.json").write_text(json.dumps({**config.to_dict(), "colour": "red"}))
    with pytest.raises(UserError, match="not a valid model config: config has unknown fields: colour"):
        open_checkpoint(out)
    (out / "config.json").write_text(json.dumps({**config.to_dict(), "d_model": "wide"}))
    with pytest.raises(UserError, match="not a valid model config"):
        open_checkpoint(out)
    (out / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    with pytest.raises(UserError, match="convert hf"):
        open_checkpoint(out)
    (out / "config.json").write_text(config.to_json())
    (out / WEIGHTS_FILE).unlink()
    with pytest.raises(UserError, match="has no weights"):
        open_checkpoint(out)


def test_truncated_file(tmp_path, config):
    out = make_ck(tmp_path, config)
    weights = out / WEIGHTS_FILE
    raw = weights.read_bytes()
    weights.write_bytes(raw[:-5])
    with pytest.raises(UserError, match=f"model.safetensors is truncated: expected {len(raw)} bytes, found {len(raw) - 5}"):
        open_checkpoint(out)
    weights.write_bytes(raw[:30])  # cut inside the header
    with pytest.raises(UserError, match="is truncated: expected at least"):
        open_checkpoint(out)
    weights.write_bytes(raw[:3])
    with pytest.raises(UserError, match="is truncated: expected at least 8 bytes, found 3"):
        open_checkpoint(out)


@pytest.mark.parametrize(
    ("damage", "fragment"),
    [
        (lambda raw: (2**40).to_bytes(8, "little") + raw[8:], "implausible header length"),
        (lambda raw: raw[:8] + b"}" + raw[9:], "invalid JSON"),
        (lambda raw: raw[:8] + b"\xff" + raw[9:], "invalid JSON"),
    ],
)
def test_corrupt_header_bytes(tmp_path, config, damage, fragment):
    out = make_ck(tmp_path, config)
    weights = out / WEIGHTS_FILE
    weights.write_bytes(damage(weights.read_bytes()))
    with pytest.raises(UserError, match=f"corrupt safetensors header: {fragment}"):
        open_checkpoint(out)


def _set(header, name, key, value):
    header[name][key] = value
    return header


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (lambda h: _set(h, "b", "dtype", "F8_E4M3"), "unknown dtype 'F8_E4M3' for b"),
        (lambda h: _set(h, "b", "shape", [5]), r"b has 16 bytes but shape \[5\] of F32 needs 20"),
        (lambda h: _set(h, "b", "shape", [-4]), "shape of b must be a list of non-negative integers"),
        (lambda h: _set(h, "b", "data_offsets", [40, 24]), r"data_offsets of b are out of order: \[40, 24\]"),
        (lambda h: _set(h, "b", "data_offsets", [16, 32]), "data of b overlaps a"),
        (lambda h: _set(h, "b", "shape", [3]) and _set(h, "b", "data_offsets", [28, 40]), "unused bytes 24..28 before b"),
        (lambda h: _set(h, "b", "data_offsets", [24]), "data_offsets of b must be two non-negative integers"),
        (lambda h: {**h, "c": [1, 2]}, "entry for c must have exactly dtype, shape and data_offsets"),
        (lambda h: [h], "the header is not a JSON object"),
        (lambda h: {**h, "__metadata__": {"format": 1}}, "__metadata__ must map strings to strings"),
    ],
)
def test_corrupt_header_fields(tmp_path, config, edit, fragment):
    out = make_ck(tmp_path, config)
    rewrite_header(out / WEIGHTS_FILE, edit)
    with pytest.raises(UserError, match=f"corrupt safetensors header: {fragment}"):
        open_checkpoint(out)


def test_duplicate_tensor_in_header(tmp_path, config):
    out = make_ck(tmp_path, config)
    weights = out / WEIGHTS_FILE
    raw = weights.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = raw[8 : 8 + n].rstrip()
    entry = b'"b":{"dtype":"F32","shape":[4],"data_offsets":[24,40]}'
    assert entry in header
    header = header[:-1] + b"," + entry + b"}"
    header += b" " * (-len(header) % 8)
    weights.write_bytes(len(header).to_bytes(8, "little") + header + raw[8 + n :])
    with pytest.raises(UserError, match="invalid JSON .*duplicate key 'b'"):
        open_checkpoint(out)


def test_trailing_bytes_after_data(tmp_path, config):
    out = make_ck(tmp_path, config)
    with open(out / WEIGHTS_FILE, "ab") as fh:
        fh.write(b"junk")
    with pytest.raises(UserError, match="4 bytes after the last tensor's data"):
        open_checkpoint(out)


def test_broken_shard_index(tmp_path, config):
    out = make_ck(tmp_path, config, max_shard_bytes=16)  # "a" (24 bytes) and "b" (16) apart
    index_path = out / INDEX_FILE
    index = json.loads(index_path.read_text())
    assert index["weight_map"] == {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}

    def write_index(weight_map):
        index_path.write_text(json.dumps({"metadata": index["metadata"], "weight_map": weight_map}))

    write_index({**index["weight_map"], "b": "model-00003-of-00003.safetensors"})
    with pytest.raises(UserError, match="names shard model-00003-of-00003.safetensors, which is missing"):
        open_checkpoint(out)
    write_index({"a": "model-00002-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"})
    with pytest.raises(UserError, match=f"{INDEX_FILE} places a in model-00002-of-00002.safetensors, but that file does not hold it"):
        open_checkpoint(out)
    write_index({"a": "model-00002-of-00002.safetensors", "b": "model-00001-of-00002.safetensors"})
    with pytest.raises(UserError, match="places a in model-00002-of-00002.safetensors, but it is in model-00001-of-00002"):
        open_checkpoint(out)
    write_index({"a": "model-00001-of-00002.safetensors", "c": "model-00002-of-00002.safetensors"})
    with pytest.raises(UserError, match="does not list b"):
        open_checkpoint(out)
    write_index({"a": "../escape.safetensors"})
    with pytest.raises(UserError, match="invalid shard file '../escape.safetensors'"):
        open_checkpoint(out)
    index_path.write_text("[")
    with pytest.raises(UserError, match="index .* is not valid JSON"):
        open_checkpoint(out)
    index_path.write_text("{}")
    with pytest.raises(UserError, match="has no valid weight_map"):
        open_checkpoint(out)


def test_check_state_dict_matches_names_the_first_difference():
    expected = {"decoder.blocks.0.attn.qkv.weight": (192, 64), "embed.weight": (512, 64)}
    check_state_dict_matches(expected, {k: list(v) for k, v in expected.items()})
    with pytest.raises(UserError, match=(
        r"^config does not match the weights: decoder.blocks.0.attn.qkv.weight has shape \[96, 64\] "
        r"in the file, the config expects \[192, 64\]$"
    )):
        check_state_dict_matches(expected, {**expected, "decoder.blocks.0.attn.qkv.weight": torch.Size([96, 64])})
    with pytest.raises(UserError, match="embed.weight is missing from the weights$"):
        check_state_dict_matches(expected, {"decoder.blocks.0.attn.qkv.weight": (192, 64)})
    with pytest.raises(UserError, match=r"a.extra is in the weights but the config has no such tensor \(and 1 more"):
        check_state_dict_matches(expected, {"a.extra": (1,), "decoder.blocks.0.attn.qkv.weight": (192, 64)})


def test_errors_are_single_lines(tmp_path, config):
    out = make_ck(tmp_path, config)
    (out / "config.json").write_text("{\n\n bad")
    with pytest.raises(UserError) as info:
        open_checkpoint(out)
    assert "\n" not in str(info.value)


def test_misaligned_tensor_from_a_foreign_writer_is_read_as_an_aligned_copy(tmp_path, config):
    # One byte of U8 first pushes the F32 tensor to offset 1, which our writer never does.
    header = json.dumps({
        "a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [1, 9]},
    }).encode()
    header += b" " * (-len(header) % 8)
    values = torch.tensor([1.5, -2.25])
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "config.json").write_text(config.to_json())
    (tmp_path / "ck" / WEIGHTS_FILE).write_bytes(
        len(header).to_bytes(8, "little") + header + b"\x07" + bits(values)
    )
    assert torch.equal(load_file(tmp_path / "ck" / WEIGHTS_FILE)["b"], values)
    with open_checkpoint(tmp_path / "ck") as ck:
        b = ck.get("b")
        assert torch.equal(b, values) and b.data_ptr() % 4 == 0
        assert ck.get("a").tolist() == [7]


def test_empty_state_dict_is_a_valid_checkpoint(tmp_path, config):
    prov = save_checkpoint(tmp_path / "ck", config, {})
    assert prov["num_parameters"] == 0 and prov["dtype"] is None
    assert load_file(tmp_path / "ck" / WEIGHTS_FILE) == {}
    with open_checkpoint(tmp_path / "ck") as ck:
        assert ck.tensor_names() == [] and ck.dtype_summary() == {}


def test_writer_records_a_crc32_per_tensor_and_per_expert_block(tmp_path):
    import zlib

    from cpmctl.checkpoint import BlockCRC, save_checkpoint

    experts = torch.randn(5, 3, 7)
    plain = torch.randn(4, 6)
    config = ModelConfig.from_preset("llama-tiny")
    provenance = save_checkpoint(tmp_path / "c", config, {"a.w_in": experts, "b.weight": plain, "c.empty": torch.empty(0)})
    crcs = provenance["tensor_crc32"]
    assert crcs["a.w_in"] == [zlib.crc32(experts[i].numpy().tobytes()) for i in range(5)]
    assert crcs["b.weight"] == [zlib.crc32(plain.numpy().tobytes())]
    assert crcs["c.empty"] == [0]
    # Chunks that straddle block boundaries give the same blocks.
    data = experts.numpy().tobytes()
    crc = BlockCRC(len(data), 5)
    for start in range(0, len(data), 37):
        crc.feed(memoryview(data)[start : start + 37])
    assert crc.result() == crcs["a.w_in"]
