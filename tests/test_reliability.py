"""Fault injection (issue 23): bad inputs, corrupt files and a hostile environment across every
command, each asserting exit 2 (or the signal's code), one `error:` line, no traceback, no
"internal error", and every file that existed before untouched. Plus: --force replaces only our
own outputs, derived checkpoints record verified parents, resume checks, stale temporaries,
the umask, prompt-tune determinism, SIGINT, and (slow) kill -9 at seeded byte offsets.

Set CPMCTL_RELIABILITY_TABLE=FILE.jsonl to have every table case append its row (case,
expected, observed) there: RELIABILITY.md's table is made from it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from typer.testing import CliRunner

from cpmctl.checkpoint import load_model, open_checkpoint, read_provenance, save_model, verify_checkpoint
from cpmctl.cli import app
from cpmctl.config import ModelConfig
from cpmctl.fsutil import remove_stale_temporaries, write_checksums
from cpmctl.model import build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


# -- one small world, built once -------------------------------------------------------------------
def _task(path: Path, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "value", "thing", "other", "table"]
    with open(path, "w") as fh:
        for i in range(n):
            label = "yes" if i % 2 else "no"
            text = " ".join(rng.choice(words) for _ in range(5)) + (" good" if label == "yes" else " bad")
            fh.write(json.dumps({"text": text, "label": label}) + "\n")
    return path


def invoke(*args) -> "object":
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def world(tmp_path_factory, sp_tokenizer, stdlib_text) -> Path:
    from cpmctl.data import prepare

    w = tmp_path_factory.mktemp("world")
    tok = sp_tokenizer.save(w / "tok")
    shutil.copyfile(stdlib_text, w / "corpus.txt")
    torch.manual_seed(0)
    bert = build_model(ModelConfig.from_preset("bert-tiny", vocab_size=sp_tokenizer.vocab_size, max_positions=32, init_std=0.1))
    save_model(bert, w / "bert", tokenizer_dir=tok, stage="test")
    llama = build_model(ModelConfig.from_preset("llama-tiny", vocab_size=sp_tokenizer.vocab_size, max_positions=64, init_std=0.1))
    save_model(llama, w / "llama", tokenizer_dir=tok, stage="test")
    _task(w / "task.jsonl", 24, 1)
    prepare(w / "corpus.txt", sp_tokenizer, w / "shards", shard_tokens=2**16)
    (w / "recipe.toml").write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in {
        "preset": "llama-tiny", "data": str(w / "shards"), "tokenizer": str(tok), "seq_len": 16, "batch_size": 4,
        "max_steps": 2, "log_every": 1, "eval_batches": 1, "device": "cpu"}.items()) + "\nmodel.max_positions = 64\n")
    for argv in (["pretrain", w / "recipe.toml", w / "run"],
                 ["prompt-tune", w / "bert", w / "adapter", "--train", w / "task.jsonl", "--prompt-length", 2, "--max-steps", 2,
                  "--batch-size", 4, "--device", "cpu", "--head", "linear"],
                 ["convert", "hf", w / "bert", w / "hf", "--export"],
                 ["moefy", w / "llama", w / "moe", "--experts", 4, "--router", "center"]):
        result = invoke(*argv)
        assert result.exit_code == 0, result.output
    return w


@pytest.fixture
def w(world, tmp_path) -> Path:
    """A private copy of the world: a case may corrupt it."""
    copy = tmp_path / "w"
    shutil.copytree(world, copy, symlinks=True)
    recipe = copy / "recipe.toml"
    recipe.write_text(recipe.read_text().replace(str(world), str(copy)))  # the copy's own inputs
    return copy


def snapshot(root: Path) -> dict[str, str]:
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            out[path.relative_to(root).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
        elif path.is_dir():
            out[path.relative_to(root).as_posix() + "/"] = ""
    return out


# -- corruptions -----------------------------------------------------------------------------------
def flip(path: Path, where: float) -> None:
    """Flip one bit of the tensor data at a fraction `where` of the data section."""
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    i = header + int((len(data) - header - 1) * where)
    data[i] ^= 0x10
    path.write_bytes(bytes(data))


def edit_json(path: Path, change: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def crc_table(change):
    return lambda w, ckpt: edit_json(w / ckpt / "cpmctl.json", lambda d: change(d))


def first_tensor(d: dict) -> str:
    return sorted(d["tensor_crc32"])[0]


CORRUPTIONS: dict[str, Callable[[Path, str], None]] = {
    "flipped byte (start)": lambda w, c: flip(w / c / "model.safetensors", 0.01),
    "flipped byte (middle)": lambda w, c: flip(w / c / "model.safetensors", 0.5),
    "flipped byte (end)": lambda w, c: flip(w / c / "model.safetensors", 0.999),
    "tensor_crc32 a string": crc_table(lambda d: d.update(tensor_crc32="oops")),
    "tensor_crc32 value a string": crc_table(lambda d: d["tensor_crc32"].update({first_tensor(d): "12"})),
    "tensor_crc32 wrong count": crc_table(lambda d: d["tensor_crc32"].update({first_tensor(d): [1, 2, 3, 4, 5, 6, 7]})),
    "tensor_crc32 missing a tensor": crc_table(lambda d: d["tensor_crc32"].pop(first_tensor(d))),
    "tensor_crc32 wrong value": crc_table(lambda d: d["tensor_crc32"].update({first_tensor(d): [d["tensor_crc32"][first_tensor(d)][0] ^ 1]})),
    "truncated weights": lambda w, c: (w / c / "model.safetensors").write_bytes((w / c / "model.safetensors").read_bytes()[:-40]),
    "config field of the wrong type": lambda w, c: edit_json(w / c / "config.json", lambda d: d.update(d_model=str(d["d_model"]))),
}
CORRUPTION_FRAGMENTS = {
    "flipped byte (start)": "checksum mismatch in tensor", "flipped byte (middle)": "checksum mismatch in tensor",
    "flipped byte (end)": "checksum mismatch in tensor", "tensor_crc32 a string": "malformed",
    "tensor_crc32 value a string": "malformed", "tensor_crc32 wrong count": "malformed",
    "tensor_crc32 missing a tensor": "miss 1 tensor", "tensor_crc32 wrong value": "checksum mismatch in tensor",
    "truncated weights": "truncated", "config field of the wrong type": "field d_model expects an integer",
}
# Every command that loads a checkpoint: (name, checkpoint it loads, argv with {w} and {out})
LOADERS = {
    "infer generate": ("llama", ["infer", "{w}/llama", "hello there", "--max-new-tokens", "2"]),
    "infer embed": ("bert", ["infer", "{w}/bert", "hello there"]),
    "inherit": ("bert", ["inherit", "{w}/bert", "{out}", "--to", "n_layers=3"]),
    "moefy": ("llama", ["moefy", "{w}/llama", "{out}", "--experts", "4", "--router", "center"]),
    "prompt-tune": ("bert", ["prompt-tune", "{w}/bert", "{out}", "--train", "{w}/task.jsonl", "--prompt-length", "2",
                             "--max-steps", "1", "--batch-size", "4", "--device", "cpu", "--head", "linear"]),
    "convert hf --export": ("bert", ["convert", "hf", "{w}/bert", "{out}", "--export"]),
    "distill": ("bert", ["distill", "--teacher", "{w}/bert", "{out}", "--train", "{w}/task.jsonl", "--max-steps", "1",
                         "--batch-size", "4", "--device", "cpu", "--student-layers", "1"]),
    "moefy --restore": ("moe", ["moefy", "{w}/moe", "{out}", "--restore"]),
}
# Every command that writes an output: (argv with {w} and {out}, its first input or None)
WRITERS = {
    "convert hf": (["convert", "hf", "{w}/hf", "{out}"], "{w}/hf"),
    "convert hf --export": (["convert", "hf", "{w}/bert", "{out}", "--export"], "{w}/bert"),
    "inherit": (["inherit", "{w}/bert", "{out}", "--to", "n_layers=3"], "{w}/bert"),
    "moefy": (["moefy", "{w}/llama", "{out}", "--experts", "4", "--router", "center"], "{w}/llama"),
    "prompt-tune": (LOADERS["prompt-tune"][1], "{w}/bert"),
    "distill": (LOADERS["distill"][1], "{w}/bert"),
    "pretrain": (["pretrain", "{w}/recipe.toml", "{out}"], "{w}/shards"),
    "tokenizer train": (["tokenizer", "train", "{w}/corpus.txt", "{out}", "--vocab-size", "600"], "{w}/corpus.txt"),
    "data prepare": (["data", "prepare", "{w}/corpus.txt", "{out}", "--tokenizer", "{w}/tok"], "{w}/corpus.txt"),
    "data stdlib": (["data", "stdlib", "{out}", "--max-docs", "2000", "--num-classes", "2", "--min-per-class", "5"], None),
}


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]
    fragment: str
    prepare: Callable[[Path], None] | None = None
    environment: Callable[[pytest.MonkeyPatch, Path], None] | None = None
    code: int = 2


def _fill(argv, out="{w}/new"):
    return tuple(a.replace("{out}", out) for a in argv)


def _cases() -> list[Case]:
    cases: list[Case] = []
    add = cases.append
    # 1. --force is safe: OUT apart from inputs, replaced only when it is our own earlier output
    for name, (argv, source) in WRITERS.items():
        foreign = lambda w: ((w / "foreign").mkdir(), (w / "foreign" / "keep.txt").write_text("mine"))  # noqa: E731
        add(Case(f"{name}: --force over a foreign directory", _fill(argv, "{w}/foreign") + ("--force",),
                 "not an earlier output of this command", foreign))
        add(Case(f"{name}: OUT exists, no --force", _fill(argv, "{w}/foreign"), "already exists", foreign))
        add(Case(f"{name}: --force over a file", _fill(argv, "{w}/afile") + ("--force",), "is a file",
                 lambda w: (w / "afile").write_text("x")))
        if source is not None:
            add(Case(f"{name}: OUT is the input", _fill(argv, source) + ("--force",), "is the input"))
            add(Case(f"{name}: OUT contains the input", _fill(argv, "{w}") + ("--force",), "contains the input"))
            add(Case(f"{name}: OUT inside the input", _fill(argv, source + "/sub") + ("--force",), "is inside the input"))
    # 2. corrupt checkpoints are refused by every loader
    for loader, (ckpt, argv) in LOADERS.items():
        for corruption, apply in CORRUPTIONS.items():
            if ckpt == "moe" and corruption == "config field of the wrong type":
                continue
            add(Case(f"{loader}: {corruption}", _fill(argv), CORRUPTION_FRAGMENTS[corruption],
                     lambda w, apply=apply, ckpt=ckpt: apply(w, ckpt)))
    add(Case("infer: NaN weights", ("infer", "{w}/nan", "hello", "--max-new-tokens", "2"), "NaN or infinite", make_nan))
    add(Case("infer --prompt: flipped adapter byte", ("infer", "{w}/bert", "--prompt", "{w}/adapter", "--input", "{w}/task.jsonl"),
             "checksum mismatch in tensor", lambda w: flip(w / "adapter" / "adapter_model.safetensors", 0.5)))
    add(Case("infer --prompt: truncated adapter", ("infer", "{w}/bert", "--prompt", "{w}/adapter", "--input", "{w}/task.jsonl"),
             "truncated", lambda w: (w / "adapter" / "adapter_model.safetensors").write_bytes(
                 (w / "adapter" / "adapter_model.safetensors").read_bytes()[:-8])))
    add(Case("inherit: parent content_hash not a string", ("inherit", "{w}/bert", "{w}/new", "--to", "n_layers=3"),
             "has no content_hash", lambda w: edit_json(w / "bert" / "cpmctl.json", lambda d: d.update(content_hash=5))))
    # 3. training states: verified on --resume
    resume = ("pretrain", "{w}/recipe.toml", "{w}/run", "--resume", "--set", "max_steps=3")
    for part in ("model.safetensors", "optimizer.safetensors", "rng.safetensors"):
        for where in (0.1, 0.9):
            add(Case(f"pretrain --resume: flipped byte in {part} at {where:.0%}", resume, "checksum mismatch in tensor",
                     lambda w, part=part, where=where: flip(state_dir(w) / part, where)))
    for part in ("trainer.json", "optimizer.json", "rng.json"):
        add(Case(f"pretrain --resume: changed byte in {part}", resume, "checksum mismatch",
                 lambda w, part=part: edit_bytes(state_dir(w) / part)))
    add(Case("pretrain --resume: truncated trainer.json (checksums updated)", resume, "trainer.json is unreadable",
             lambda w: rewrite_state_json(w, lambda text: text[: len(text) // 2])))
    add(Case("pretrain --resume: trainer.json step a string (checksums updated)", resume, "field step expects an integer",
             lambda w: rewrite_state_json(w, lambda text: json.dumps({**json.loads(text), "step": "x"}))))
    add(Case("pretrain --resume: malformed checksums.json", resume, "checksum record",
             lambda w: (state_dir(w) / "checksums.json").write_text("{oops")))
    add(Case("pretrain --resume: checksums.json of the wrong shape", resume, "malformed",
             lambda w: (state_dir(w) / "checksums.json").write_text('{"crc32": {"trainer.json": "x"}}')))
    add(Case("pretrain --resume --force", resume + ("--force",), "give one of them"))
    for setting, value in (("batch_size", "2"), ("seed", "5"), ("lr", "0.5"), ("seq_len", "8"), ("grad_accum", "2")):
        add(Case(f"pretrain --resume with changed {setting}", resume + ("--set", f"{setting}={value}"), f"{setting} ("))
    add(Case("pretrain --resume without a state", ("pretrain", "{w}/recipe.toml", "{w}/none", "--resume"), "no training state"))
    add(Case("pretrain: OUT exists without --resume or --force", ("pretrain", "{w}/recipe.toml", "{w}/run"), "pass --resume"))
    # 4. values of the wrong type, from every source
    for name, argv, option in (("pretrain", ("pretrain", "{w}/recipe.toml", "{w}/new"), "lr"),
                               ("prompt-tune", _fill(LOADERS["prompt-tune"][1]), "lr"),
                               ("distill", _fill(LOADERS["distill"][1]), "lr"),
                               ("moefy", _fill(LOADERS["moefy"][1]), "epochs"),
                               ("infer", ("infer", "{w}/llama", "hi"), "max_new_tokens"),
                               ("data stdlib", ("data", "stdlib", "{w}/new"), "num_classes")):
        add(Case(f"{name}: --set {option}=abc", argv + ("--set", f"{option}=abc"), f"option {option} (--set) expects"))
        add(Case(f"{name}: --config with {option} a string", argv + ("--config", "{w}/bad.toml"), f"option {option} (--config",
                 lambda w, option=option: (w / "bad.toml").write_text(f'{option} = "lots"\n')))
    add(Case("pretrain: recipe with a string for a number", ("pretrain", "{w}/bad-recipe.toml", "{w}/new"), "expects",
             lambda w: (w / "bad-recipe.toml").write_text((w / "recipe.toml").read_text().replace("batch_size = 4", 'batch_size = "four"'))))
    add(Case("run: pipeline step option of the wrong type", ("run", "{w}/pipe.toml", "{w}/new"), "expects",
             lambda w: (w / "pipe.toml").write_text('[[step]]\nname = "d"\nrun = "data stdlib"\nnum_classes = "two"\n')))
    # 5. validation gaps
    for option, value, fragment in (("--num-classes", "0", "at least 2 classes"), ("--num-classes", "1", "at least 2 classes"),
                                    ("--max-per-class", "-1", "max per class must be >= 1"), ("--max-per-class", "0", "max per class must be >= 1"),
                                    ("--min-per-class", "0", "min per class must be >= 1"), ("--max-docs", "0", "max docs must be >= 1")):
        add(Case(f"data stdlib {option} {value}", ("data", "stdlib", "{w}/new", option, value), fragment))
    mixed_argv = tuple(a.replace("{w}/task.jsonl", "{w}/mixed.jsonl") for a in _fill(LOADERS["prompt-tune"][1]))
    add(Case("prompt-tune: an integer label among string labels", mixed_argv, "is an integer, but line 1's label", lambda w: (w / "mixed.jsonl").write_text(
            (w / "task.jsonl").read_text() + json.dumps({"text": "alpha", "label": 1}) + "\n")))
    add(Case("infer: --max-new-tokens past max_positions", ("infer", "{w}/llama", "hello", "--max-new-tokens", "100000"),
             "exceeds the model's 64 positions"))
    add(Case("infer --dry-run: --max-new-tokens past max_positions",
             ("infer", "{w}/llama", "hello", "--max-new-tokens", "100000", "--dry-run"), "exceeds the model's 64 positions"))
    add(Case("infer: a prompt longer than max_positions", ("infer", "{w}/llama", " ".join(["value"] * 80), "--max-new-tokens", "1"),
             "exceeds the model's 64 positions"))
    for name, argv, extra, fragment in (
            ("prompt-tune", _fill(LOADERS["prompt-tune"][1]), ("--batch-size", "0"), "--batch-size must be >= 1"),
            ("moefy", _fill(LOADERS["moefy"][1]), ("--top-k", "0"), "--top-k must be >= 1"),
            ("pretrain", ("pretrain", "{w}/recipe.toml", "{w}/new"), ("--set", "optimizer=\"sgd\""), "unknown optimizer"),
            ("distill", _fill(LOADERS["distill"][1]), ("--train-fraction", "2"), "train-fraction"),
            ("inherit", _fill(WRITERS["inherit"][0]), ("--method", "magic"), "magic")):
        add(Case(f"{name}: {' '.join(extra)}", argv + extra, fragment))
        add(Case(f"{name} --dry-run: {' '.join(extra)}", argv + extra + ("--dry-run",), fragment))
    for name in ("inherit", "moefy", "prompt-tune", "pretrain"):
        argv, source = WRITERS[name]
        add(Case(f"{name} --dry-run: OUT is the input", _fill(argv, source) + ("--force", "--dry-run"), "is the input"))
    # 6. the environment: a full disk, a read-only file system, a forbidden path
    for name in ("data stdlib", "convert hf", "inherit", "tokenizer train", "prompt-tune", "moefy"):
        argv = _fill(WRITERS[name][0])
        add(Case(f"{name}: disk full while writing", argv, "no space left on the device", environment=fail_fsync(errno.ENOSPC)))
        add(Case(f"{name}: read-only file system", argv, "the file system is read-only", environment=fail_mkdtemp(errno.EROFS)))
        add(Case(f"{name}: permission denied", argv, "permission denied", environment=fail_mkdtemp(errno.EACCES)))
    for name in ("convert hf", "inherit", "moefy"):
        add(Case(f"{name}: not enough free space (checked first)", _fill(WRITERS[name][0]), "bytes needed",
                 environment=tiny_disk))
    return cases


def state_dir(w: Path) -> Path:
    return sorted((w / "run" / "state").iterdir())[-1]


def edit_bytes(path: Path) -> None:
    text = path.read_text()
    i = max(text.find("1"), text.find("0"))
    path.write_text(text[:i] + ("7" if text[i] != "7" else "8") + text[i + 1:])


def rewrite_state_json(w: Path, change: Callable[[str], str]) -> None:
    state = state_dir(w)
    (state / "trainer.json").write_text(change((state / "trainer.json").read_text()))
    write_checksums(state, ["optimizer.json", "rng.json", "trainer.json"])


def make_nan(w: Path) -> None:
    model, ckpt = load_model(w / "llama")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ckpt.close()
    name = next(k for k, v in state.items() if v.dim() == 2 and "ffn" in k)
    state[name][0, 0] = float("nan")
    from cpmctl.checkpoint import save_checkpoint

    save_checkpoint(w / "nan", model.config, state, tokenizer_dir=w / "tok", stage="test")


def fail_fsync(code: int):
    def patch(monkeypatch, w):
        def broken(root):
            raise OSError(code, os.strerror(code))
        monkeypatch.setattr("cpmctl.fsutil.fsync_tree", broken)
    return patch


def fail_mkdtemp(code: int):
    def patch(monkeypatch, w):
        real = __import__("tempfile").mkdtemp

        def broken(suffix=None, prefix=None, dir=None):
            if dir is not None and Path(dir).resolve().is_relative_to(w.resolve()):
                raise OSError(code, os.strerror(code), str(dir))
            return real(suffix, prefix, dir)
        monkeypatch.setattr("tempfile.mkdtemp", broken)
        monkeypatch.setattr("tempfile.mkstemp", lambda *a, dir=None, **k: (_ for _ in ()).throw(OSError(code, os.strerror(code), str(dir))))
    return patch


def tiny_disk(monkeypatch, w):
    import collections

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr("shutil.disk_usage", lambda path: usage(10_000, 9_990, 10))


CASES = _cases()


def _record(case: Case, result, untouched: bool) -> None:
    table = os.environ.get("CPMCTL_RELIABILITY_TABLE")
    if not table:
        return
    lines = [line for line in result.stderr.splitlines() if line.startswith("error")]
    observed = f"exit {result.exit_code}: {lines[0] if lines else ''}"
    if "Traceback" in result.output:
        observed += " [traceback]"
    with open(table, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"case": case.id, "expected": f"exit {case.code}: error naming '{case.fragment}'",
                             "observed": observed, "untouched": untouched}) + "\n")


def test_the_sweep_is_large_enough():
    assert len(CASES) >= 200 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_exit_2_and_touches_nothing(case: Case, w: Path, monkeypatch):
    if case.prepare is not None:
        case.prepare(w)
    before = snapshot(w)
    if case.environment is not None:
        case.environment(monkeypatch, w)
    result = invoke(*(a.replace("{w}", str(w)) for a in case.argv))
    monkeypatch.undo()
    after = snapshot(w)
    # what existed is unchanged, and nothing partial appeared: no OUT of a failed write, no temporary
    untouched = all(after.get(k) == v for k, v in before.items()) and not any(
        k.startswith(("new/", ".new.")) or "/.new." in k for k in set(after) - set(before))
    _record(case, result, untouched)
    lines = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert result.exit_code == case.code, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr  # other lines: progress, warnings
    assert case.fragment in lines[0], lines[0]
    assert "Traceback" not in result.output and "internal error" not in result.output
    assert untouched, "pre-existing files changed"


# -- what --force may do, what derived checkpoints record -------------------------------------------
def test_force_replaces_an_earlier_output_of_the_same_command(w):
    first = invoke("inherit", w / "bert", w / "grown", "--to", "n_layers=3")
    assert first.exit_code == 0, first.output
    again = invoke("inherit", w / "bert", w / "grown", "--to", "n_layers=3", "--seed", "1", "--force")
    assert again.exit_code == 0, again.output
    # another command's checkpoint is not inherit's to replace
    other = invoke("moefy", w / "llama", w / "grown", "--experts", "4", "--router", "center", "--force")
    assert other.exit_code == 2 and "not an earlier output of this command" in other.stderr
    assert read_provenance(w / "grown")["stage"] == "inherit"


def test_derived_checkpoints_record_their_parent_as_verified(w):
    assert invoke("inherit", w / "bert", w / "grown", "--to", "n_layers=3").exit_code == 0
    parent = read_provenance(w / "grown")["parents"][0]
    assert parent["verified"] is True and parent["content_hash"] == read_provenance(w / "bert")["content_hash"]
    shutil.copytree(w / "bert", w / "bert2")  # not read in this process yet
    result = invoke("inherit", w / "bert2", w / "unchecked", "--to", "n_layers=3", "--no-verify")
    assert result.exit_code == 0 and read_provenance(w / "unchecked")["parents"][0]["verified"] is False


def test_no_verify_skips_the_check(w):
    flip(w / "llama" / "model.safetensors", 0.5)
    assert invoke("infer", w / "llama", "hi", "--max-new-tokens", "1").exit_code == 2
    assert invoke("infer", w / "llama", "hi", "--max-new-tokens", "1", "--no-verify").exit_code == 0


def test_nan_weights_warn_at_load(w, caplog):
    make_nan(w)
    with caplog.at_level("WARNING", logger="cpmctl"):
        model, ckpt = load_model(w / "nan")
    assert ckpt.nonfinite and "NaN or infinite weights in" in caplog.text and ckpt.nonfinite[0] in caplog.text


def test_resume_with_listed_changes_is_accepted_and_logged(w):
    result = invoke("pretrain", w / "recipe.toml", w / "run", "--resume", "--set", "max_steps=3", "--set", "lr=0.002",
                    "--resume-with-changes", "lr")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (w / "run" / "metrics.jsonl").read_text().splitlines()]
    change = next(r for r in records if r.get("event") == "resume_with_changes")
    assert change["changes"] == {"lr": {"before": 0.001, "after": 0.002}}


# -- leftovers and permissions ---------------------------------------------------------------------
def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".out.tmp-{dead_pid}-abc"
    (stale / "inner").mkdir(parents=True)
    live = tmp_path / f".out.tmp-{os.getpid()}-def"
    live.mkdir()
    other = tmp_path / f".other.tmp-{dead_pid}-x"
    other.mkdir()
    result = invoke("data", "stdlib", tmp_path / "out", "--max-docs", "2000", "--num-classes", "2", "--min-per-class", "5")
    assert result.exit_code == 0, result.output
    assert not stale.exists() and live.exists() and other.exists()
    assert remove_stale_temporaries(tmp_path / "out") == []


@pytest.mark.parametrize("mask, dir_mode, file_mode", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600), (0o002, 0o775, 0o664)])
def test_outputs_respect_the_umask(tmp_path, mask, dir_mode, file_mode):
    before = os.umask(mask)
    try:
        result = invoke("data", "stdlib", tmp_path / "out", "--max-docs", "2000", "--num-classes", "2", "--min-per-class", "5")
    finally:
        os.umask(before)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out").stat().st_mode & 0o777 == dir_mode
    assert (tmp_path / "out" / "corpus.txt").stat().st_mode & 0o777 == file_mode
    assert (tmp_path / "out" / "task" / "train.jsonl").stat().st_mode & 0o777 == file_mode


# -- prompt-tune is deterministic -------------------------------------------------------------------
@pytest.mark.parametrize("extra", [("--head", "linear", "--reparam", "mlp"), ("--head", "linear"), ("--head", "linear", "--init", "random", "--deep")])
def test_prompt_tune_twice_with_one_seed_gives_identical_prompts(w, extra):
    from cpmctl.prompt import load_adapter

    for out in ("a", "b"):
        torch.manual_seed(1234 if out == "a" else 99)  # whatever the global generator held before
        result = invoke("prompt-tune", w / "bert", w / out, "--train", w / "task.jsonl", "--dev", w / "task.jsonl",
                        "--prompt-length", "3", "--max-steps", "4", "--eval-every", "2", "--batch-size", "4",
                        "--device", "cpu", *extra)
        assert result.exit_code == 0, result.output
    a, b = load_adapter(w / "a"), load_adapter(w / "b")
    assert torch.equal(a.prompt, b.prompt)
    assert a.head.keys() == b.head.keys() and all(torch.equal(a.head[k], b.head[k]) for k in a.head)


# -- signals and kill -9 (subprocesses) -------------------------------------------------------------
def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "kernels")])}


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_saves_a_resumable_state_and_exits(w, sig, code):
    out = w / "long"
    cmd = [sys.executable, "-m", "cpmctl", "pretrain", str(w / "recipe.toml"), str(out), "--set", "max_steps=100000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    deadline = time.monotonic() + 120
    while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().count("\n") >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "interrupted by" in err and "Traceback" not in err
    states = sorted((out / "state").iterdir())
    assert states, "no state saved"
    step = json.loads((states[-1] / "trainer.json").read_text())["step"]
    resumed = subprocess.run([sys.executable, "-m", "cpmctl", "pretrain", str(w / "recipe.toml"), str(out), "--resume",
                              "--set", f"max_steps={step + 1}", "--json"], capture_output=True, text=True, env=_env())
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["result"]["resumed_from"] == step


KILL_HARNESS = r"""
import os, signal, sys
import cpmctl.checkpoint as checkpoint
limit = int(sys.argv[1])
written = [0]
real = checkpoint._write_hashed
def counting(fh, digest, data):
    if written[0] + len(data) >= limit:
        fh.write(bytes(data)[: max(limit - written[0], 0)])
        fh.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    written[0] += len(data)
    return real(fh, digest, data)
checkpoint._write_hashed = counting
from cpmctl.cli import main
sys.argv = ["cpmctl", *sys.argv[2:]]
main()
"""
KILLED_COMMANDS = {
    "convert hf": (["convert", "hf", "{w}/hf", "{out}"], "checkpoint"),
    "moefy": (["moefy", "{w}/llama", "{out}", "--experts", "4", "--router", "center"], "checkpoint"),
    "prompt-tune": (LOADERS["prompt-tune"][1], "adapter"),
    "pretrain": (["pretrain", "{w}/recipe.toml", "{out}"], "run"),
}


def _complete(kind: str, out: Path) -> str:
    """A fingerprint of a complete output (raises if it is not one)."""
    if kind == "checkpoint":
        return verify_checkpoint(out)["content_hash"]
    if kind == "adapter":
        from cpmctl.prompt import load_adapter

        adapter = load_adapter(out)
        return hashlib.sha256(adapter.prompt.numpy().tobytes()).hexdigest()
    if (out / "checkpoint").exists():
        return verify_checkpoint(out / "checkpoint")["content_hash"]
    # A run killed before its checkpoint: --force started it over (deleting the old run, as the
    # option says), and what it left is resumable: every state in it complete and verified.
    from cpmctl.training_state import read_safetensors, read_trainer_record, state_dirs

    for state in state_dirs(out):
        read_trainer_record(state)
        for part in state.glob("*.safetensors"):
            read_safetensors(part)
    return f"resumable run ({len(state_dirs(out))} states)"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(KILLED_COMMANDS))
def test_kill_9_while_writing_leaves_the_old_or_the_new_output(w, name):
    argv, kind = KILLED_COMMANDS[name]
    out = w / "out"
    first = invoke(*(a.replace("{w}", str(w)).replace("{out}", str(out)) for a in argv))
    assert first.exit_code == 0, first.output
    old = _complete(kind, out)
    rng = random.Random(23)
    total = sum(f.stat().st_size for f in out.rglob("*.safetensors"))
    for limit in sorted(rng.randrange(1, total) for _ in range(4)) + [10**12]:
        cmd = [sys.executable, "-c", KILL_HARNESS, str(limit),
               *(a.replace("{w}", str(w)).replace("{out}", str(out)) for a in argv), "--force"]
        if name == "pretrain":
            cmd += ["--set", "seed=7"]
        else:
            cmd += ["--seed", "7"] if name != "convert hf" else []
        proc = subprocess.run(cmd, capture_output=True, text=True, env=_env())
        assert proc.returncode in (0, -signal.SIGKILL), proc.stderr[-2000:]
        now = _complete(kind, out)  # a complete output, never anything else
        if proc.returncode == 0:
            old = now
        else:
            assert now == old or (kind == "run" and now.startswith("resumable run")), now
    leftovers = [p for p in w.iterdir() if p.name.startswith(".out.")]
    assert invoke(*(a.replace("{w}", str(w)).replace("{out}", str(out)) for a in argv), "--force").exit_code == 0
    assert not any(p.exists() for p in leftovers)
