"""Hugging Face import and export: one module per family, registered by model_type.

`import_hf(src, out)` reads a Hugging Face model directory (config.json plus model.safetensors,
a sharded safetensors index, or pytorch_model.bin loaded with `weights_only=True`) and writes a
cpmctl checkpoint; `export_hf(checkpoint, out)` writes it back in the family's own format so
`transformers`' `AutoModel*.from_pretrained(out)` loads it. The architecture always comes from
config.json's `model_type`, never from file names.

    family.py   what a family is (config translation, tensor rules), the registry, shared readers
    decoder.py  the Llama-shaped decoders' shared translation, one switch per difference
    weights.py  reading config.json and the weights lazily (safetensors' safe_open, or .bin)
    convert.py  import_hf / export_hf and the rule engine, both directions
    experts.py  the MoE families' layers, router settings and expert tensors (both layouts)
    bert.py, t5.py, gpt2.py, llama.py, mistral.py, qwen2.py, qwen3.py, gemma.py, gemma2.py, phi3.py,
    mixtral.py, qwen2_moe.py, qwen3_moe.py, olmoe.py, deepseek_v3.py

Adding a family is adding its module here and its name in family.FAMILY_MODULES; the model core
gains whatever new feature it needs as a ModelConfig field.
"""

from importlib import import_module

from cpmctl.hf.family import FAMILY_MODULES, families, get_family

for _module in FAMILY_MODULES:
    import_module(f"cpmctl.hf.{_module}")

from cpmctl.hf.convert import (  # noqa: E402
    DEFAULT_MAX_SHARD_BYTES,
    STAGE,
    TOKENIZER_FILES,
    config_from_hf,
    config_to_hf,
    export_family,
    export_hf,
    family_of,
    import_hf,
    imported_family,
    lazy_state_dict_from_hf,
    lazy_state_dict_to_hf,
    state_dict_from_hf,
    state_dict_to_hf,
)
from cpmctl.hf.weights import HFWeights, read_hf_config  # noqa: E402

SUPPORTED_MODEL_TYPES = tuple(sorted(families()))

__all__ = [
    "DEFAULT_MAX_SHARD_BYTES", "STAGE", "SUPPORTED_MODEL_TYPES", "TOKENIZER_FILES", "HFWeights", "config_from_hf",
    "config_to_hf", "export_family", "export_hf", "family_of", "families", "get_family", "import_hf", "imported_family",
    "lazy_state_dict_from_hf", "lazy_state_dict_to_hf", "read_hf_config", "state_dict_from_hf", "state_dict_to_hf",
]
