"""Tokenizers transformers can load: a model trained by cpmctl with its own SentencePiece
tokenizer exports a tokenizer that AutoTokenizer loads with only transformers and tokenizers
(sentencepiece and protobuf hidden), special ids in config.json and generation_config.json, and
`transformers.pipeline("text-generation")` on the export gives `cpmctl infer`'s greedy text.
Imported tokenizers keep their chat template, and `cpmctl infer --chat` renders it as
transformers' apply_chat_template does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from typer.testing import CliRunner  # noqa: E402

from cpmctl import hf  # noqa: E402
from cpmctl.checkpoint import load_model, save_model  # noqa: E402
from cpmctl.generate import generate  # noqa: E402
from cpmctl.cli import app  # noqa: E402
from cpmctl.config import ModelConfig  # noqa: E402
from cpmctl.model import build_model  # noqa: E402

transformers.logging.set_verbosity_error()
PROMPTS = ["Return the number of items", "The default encoding is", "Raise an exception when", "Open the file and",
           "This module provides", "If the value is"]

# Runs in a fresh interpreter that sees site-packages without sentencepiece and protobuf.
WITHOUT_SENTENCEPIECE = """
import importlib.util, json, sys
assert importlib.util.find_spec("sentencepiece") is None and importlib.util.find_spec("google") is None
import transformers
transformers.logging.set_verbosity_error()
export, prompts = sys.argv[1], json.loads(sys.argv[2])
tok = transformers.AutoTokenizer.from_pretrained(export)
pipe = transformers.pipeline("text-generation", model=export)
out = pipe(prompts, max_new_tokens=8, do_sample=False, return_full_text=False)
ids = [tok(p, return_tensors="pt")["input_ids"] for p in prompts]
new = [pipe.model.generate(i, max_new_tokens=8, do_sample=False)[0, i.shape[1]:].tolist() for i in ids]
print(json.dumps({"ids": [i[0].tolist() for i in ids], "special": [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id],
                  "generated": [o[0]["generated_text"] for o in out], "new_ids": new}))
"""


def test_sentencepiece_model_exports_a_loadable_tokenizer(tmp_path, sp_tokenizer):
    torch.manual_seed(0)
    config = ModelConfig.from_preset("llama-tiny", vocab_size=sp_tokenizer.vocab_size, bos_token_id=None,
                                     eos_token_id=sp_tokenizer.eos_id, pad_token_id=sp_tokenizer.pad_id, init_std=0.2)
    ck = tmp_path / "ck"
    tok_dir = sp_tokenizer.save(tmp_path / "tok")
    save_model(build_model(config), ck, tokenizer_dir=tok_dir)
    exported = hf.export_hf(ck, tmp_path / "export")
    hf_config = json.loads((exported / "config.json").read_text())
    generation = json.loads((exported / "generation_config.json").read_text())
    for ids in (hf_config, generation):
        assert (ids["eos_token_id"], ids["pad_token_id"]) == (sp_tokenizer.eos_id, sp_tokenizer.pad_id)
    settings = json.loads((exported / "tokenizer_config.json").read_text())
    assert (settings["eos_token"], settings["pad_token"], settings["unk_token"]) == ("</s>", "<pad>", "<unk>")
    assert "bos_token" not in settings  # cpmctl's tokenizer has none: no <s> that would map to <unk>

    run = subprocess.run([sys.executable, "-S", "-c", WITHOUT_SENTENCEPIECE, str(exported), json.dumps(PROMPTS)],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(site_without(tmp_path))})
    assert run.returncode == 0, run.stderr[-3000:]
    theirs = json.loads(run.stdout.strip().splitlines()[-1])
    assert theirs["ids"] == [sp_tokenizer.encode(p) for p in PROMPTS]
    assert theirs["special"][1:] == [sp_tokenizer.eos_id, sp_tokenizer.pad_id]

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"text": p}) + "\n" for p in PROMPTS))
    result = CliRunner().invoke(app, ["infer", str(ck), "--input", str(prompts), "--max-new-tokens", "8", "--json"])
    assert result.exit_code == 0, result.output
    ours = [o["generated"] for o in json.loads(result.stdout)["result"]["outputs"]]
    model, handle = load_model(ck)
    handle.close()
    compared = 0
    for prompt, new_ids, text, their_text in zip(PROMPTS, theirs["new_ids"], ours, theirs["generated"]):
        want, _ = generate(model, torch.tensor([sp_tokenizer.encode(prompt)]), max_new_tokens=8, eos_token_id=sp_tokenizer.eos_id)
        assert new_ids == want[0].tolist()[: len(new_ids)] and len(new_ids) == len(want[0]), prompt  # token-identical
        # Text too, except where random weights emit a run of byte pieces that is no valid UTF-8:
        # sentencepiece decodes the valid bytes in it, transformers' ByteFallback replaces every byte.
        if not any(sp_tokenizer.id_to_token(i).startswith("<0x") for i in new_ids):
            assert their_text == text, prompt
            compared += 1
    assert compared >= 1 and any(ours)


def site_without(tmp_path: Path, hidden=("sentencepiece", "google", "protobuf")) -> Path:
    """A view of site-packages (symlinks) without the `hidden` distributions, for `python -S`."""
    import sysconfig

    view = tmp_path / "site-view"
    view.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if entry.name.split("-")[0].split(".")[0].lower() not in hidden and entry.suffix != ".pth":
            (view / entry.name).symlink_to(entry)
    return view


CHAT = ("{{ bos_token }}{% for m in messages %}{{ 'w90' if m['role'] == 'user' else 'w91' }} {{ m['content'] }} {{ eos_token }} "
        "{% endfor %}{% if add_generation_prompt %}w91 {% endif %}")


def test_imported_tokenizer_keeps_chat_template_and_infer_chat_applies_it(tmp_path):
    from test_hf_families import save_hf, word_tokenizer

    ref, src = save_hf("mistral", tmp_path)
    tok = word_tokenizer(bos=False, pad=False, chat_template=CHAT)
    tok.save_pretrained(src)
    ck = hf.import_hf(src, tmp_path / "ck")
    exported = hf.export_hf(ck, tmp_path / "export")
    assert transformers.AutoTokenizer.from_pretrained(exported).chat_template == CHAT

    messages = [{"role": "user", "content": "w5 w6 w7"}]
    want_text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    from cpmctl.tokenizer import load_tokenizer, render_chat

    assert render_chat(ck / "tokenizer", load_tokenizer(ck / "tokenizer"), "w5 w6 w7") == want_text
    assert want_text.startswith("<s>w90 w5 w6 w7 </s>")

    chat = CliRunner().invoke(app, ["infer", str(ck), "w5 w6 w7", "--chat", "--max-new-tokens", "6", "--json"])
    assert chat.exit_code == 0, chat.output
    ids = tok(want_text, return_tensors="pt")["input_ids"]  # the rendered text, as transformers tokenizes it
    with torch.inference_mode():
        new = ref.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=2, pad_token_id=2)[0, ids.shape[1]:].tolist()
    new = new[: new.index(2)] if 2 in new else new
    assert json.loads(chat.stdout)["result"]["outputs"][0]["generated"] == tok.decode(new, skip_special_tokens=True)
    plain = hf.import_hf(save_hf("llama", tmp_path / "plain")[1], tmp_path / "plain-ck")
    no_template = CliRunner().invoke(app, ["infer", str(plain), "w5", "--chat"])
    assert no_template.exit_code == 2 and "has no chat template" in no_template.output
