"""`cpmctl info`: what a checkpoint or preset is, without loading its weights.

Parameter counts come from building the model on the meta device (shapes only), so describing
the 198B MoE preset costs no memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from cpmctl.checkpoint import open_checkpoint
from cpmctl.config import ModelConfig
from cpmctl.devices import DTYPES
from cpmctl.model import build_model, parameter_counts
from cpmctl.units import human_bytes, human_count

_ESTIMATED_DTYPES = ("float32", "bfloat16", "float16")


def _counts(config: ModelConfig) -> dict[str, int]:
    return parameter_counts(build_model(config, device="meta"))


def describe_preset(name: str) -> dict[str, Any]:
    config = ModelConfig.from_preset(name)
    counts = _counts(config)
    return {
        "source": f"preset:{name}",
        "config": config.to_dict(),
        "parameters": counts,
        "dtype": None,
        "size_on_disk": None,
        "estimated_bytes": {dtype: counts["total"] * DTYPES[dtype].itemsize for dtype in _ESTIMATED_DTYPES},
        "provenance": {},
    }


def describe_checkpoint(path: Path) -> dict[str, Any]:
    with open_checkpoint(path) as ckpt:
        counts = _counts(ckpt.config)
        return {
            "source": str(path),
            "family": _hf_family(ckpt.config, ckpt.provenance),
            "config": ckpt.config.to_dict(),
            "parameters": counts,
            "dtype": ckpt.dtype_summary(),
            "size_on_disk": ckpt.size_on_disk(),
            "estimated_bytes": None,
            "provenance": ckpt.provenance,
        }


def _hf_family(config: ModelConfig, provenance: dict[str, Any]) -> str | None:
    """The Hugging Face model_type the checkpoint is (and exports as); None when none holds it."""
    from cpmctl import hf
    from cpmctl.errors import UserError

    try:
        return hf.export_family(config, hf.imported_family(provenance))
    except UserError:
        return None


_CONFIG_KEYS = (
    "arch", "vocab_size", "d_model", "n_heads", "d_head", "n_kv_heads", "d_ff", "n_layers", "n_decoder_layers",
    "norm", "norm_position", "position", "activation", "gated", "bias", "tie_embeddings", "share_layers", "share_groups", "moe",
)


def render(report: dict[str, Any]) -> None:
    console = Console()
    config = report["config"]
    table = Table(title=f"cpmctl info: {report['source']}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    if report.get("family"):
        table.add_row("family", f"{report['family']} (Hugging Face model_type)")
    for key in _CONFIG_KEYS:
        if config.get(key) is not None:
            table.add_row(key, str(config[key]))
    counts = report["parameters"]
    total = counts["total"]
    table.add_section()
    for role in ("total", "embedding", "attention", "ffn", "other"):
        share = f" ({100 * counts[role] / total:.1f}%)" if role != "total" and total else ""
        table.add_row(f"parameters: {role}", f"{human_count(counts[role])} = {counts[role]:,}{share}")
    table.add_section()
    if report["dtype"]:
        table.add_row("dtype", ", ".join(f"{k}: {human_count(v)}" for k, v in report["dtype"].items()))
    if report["size_on_disk"] is not None:
        table.add_row("size on disk", human_bytes(report["size_on_disk"]))
    if report["estimated_bytes"]:
        table.add_row("weights would take", ", ".join(f"{human_bytes(v)} in {k}" for k, v in report["estimated_bytes"].items()))
    provenance = report["provenance"]
    if provenance:
        table.add_section()
        table.add_row("stage", str(provenance.get("stage", "?")))
        table.add_row("content hash", str(provenance.get("content_hash", "?")))
        for parent in provenance.get("parents", []):
            table.add_row("parent", f"{parent.get('path')} ({parent.get('content_hash')})")
        if provenance.get("options"):
            table.add_row("options", ", ".join(f"{k}={v}" for k, v in provenance["options"].items()))
        if provenance.get("created"):
            table.add_row("created", str(provenance["created"]))
    console.print(table)
