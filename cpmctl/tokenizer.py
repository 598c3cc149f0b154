"""Tokenizers: one interface over SentencePiece models and Hugging Face `tokenizer.json` files.

The rest of cpmctl sees only `Tokenizer`: ids out of text, text out of ids, and the special ids
an objective or a model needs (pad, eos, unk, bos, BERT's mask/cls/sep, T5's sentinels).

A tokenizer saved into a checkpoint's `tokenizer/` directory is its model file, unchanged
(`tokenizer.model` or `tokenizer.json` plus the Hugging Face side files that came with it),
and `cpmctl_tokenizer.json`:

    {"format": "cpmctl-tokenizer", "version": 1, "kind": "sentencepiece" | "hf",
     "file": "tokenizer.model", "content_hash": "<sha256 of that file>", "vocab_size": N,
     "pad_id": 0, "eos_id": 1, "unk_id": 2, "bos_id": null, "mask_id": 103,
     "cls_id": null, "sep_id": null, "sentinel_ids": [3, 4, ...]}

so loading needs no guessing, and `content_hash` tells whether two models share a tokenizer.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cpmctl.corpus import DocumentReader
from cpmctl.errors import UserError
from cpmctl.fsutil import atomic_directory, check_new_output
from cpmctl.tokenizer_base import META_FILE, Tokenizer  # the interface, re-exported

SP_FILE = "tokenizer.model"
HF_FILE = "tokenizer.json"
# Files a Hugging Face tokenizer directory may carry beside tokenizer.json; they travel with it so
# an exported checkpoint loads in transformers as the original did.
HF_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                 "vocab.txt", "vocab.json", "merges.txt")
MASK_TOKEN = "<mask>"
_SENTINEL = re.compile(r"<extra_id_(\d+)>")


def sentinel_token(i: int) -> str:
    return f"<extra_id_{i}>"




# -- SentencePiece ------------------------------------------------------------------------------
class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"
    model_file = SP_FILE

    def __init__(self, model_bytes: bytes, *, source: str = "<memory>", meta: dict[str, Any] | None = None):
        import sentencepiece as spm

        self._bytes = model_bytes
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(model_bytes)
        except (RuntimeError, OSError) as exc:
            raise UserError(f"{source} is not a valid sentencepiece model ({_first_line(exc)})") from None
        if meta is not None:
            ids = _ids_from_meta(meta, source)
        else:
            ids = dict(pad_id=self._sp.pad_id(), eos_id=self._sp.eos_id(), unk_id=self._sp.unk_id(),
                       bos_id=self._sp.bos_id(), mask_id=self._known_piece(MASK_TOKEN), cls_id=None, sep_id=None)
            ids = {k: (None if v is None or v < 0 else v) for k, v in ids.items()}
            ids["sentinel_ids"] = self._sentinels()
        super().__init__(vocab_size=self._sp.get_piece_size(), **ids)

    def _known_piece(self, piece: str) -> int | None:
        token_id = self._sp.piece_to_id(piece)
        return None if self._sp.is_unknown(token_id) else token_id

    def _sentinels(self) -> list[int]:
        found = []
        while (token_id := self._known_piece(sentinel_token(len(found)))) is not None:
            found.append(token_id)
        return found

    def _encode_plain(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(texts, out_type=int) if texts else []

    def _special_affixes(self) -> tuple[list[int], list[int]]:
        prefix = [] if self.bos_id is None else [self.bos_id]
        return prefix, ([] if self.eos_id is None else [self.eos_id])

    def _decode(self, ids: list[int], skip_special: bool) -> str:
        for token_id in ids:
            if not 0 <= token_id < self.vocab_size:
                raise UserError(f"token id {token_id} is outside the vocabulary (size {self.vocab_size})")
        if skip_special:
            special = self.special_ids
            return self._sp.decode([i for i in ids if i not in special])
        # sentencepiece renders control tokens (pad, eos) as nothing; show them as their pieces.
        parts: list[str] = []
        run: list[int] = []
        for token_id in ids:
            if self._sp.is_control(token_id):
                parts.append(self._sp.decode(run))
                parts.append(self._sp.id_to_piece(token_id))
                run = []
            else:
                run.append(token_id)
        parts.append(self._sp.decode(run))
        return "".join(parts)

    def _files(self) -> dict[str, bytes]:
        return {SP_FILE: self._bytes}

    def id_to_token(self, token_id: int) -> str:
        return self._sp.id_to_piece(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self._known_piece(token)


# Fixed CPM-2/T5 layout of the ids below the learned pieces.
SP_PAD_ID, SP_EOS_ID, SP_UNK_ID = 0, 1, 2
_MAX_PIECE_CHARS = 4096  # sentencepiece skips longer training sentences; longer documents are cut


def _training_pieces(text: str) -> Iterator[str]:
    """Cut a long document at spaces into pieces sentencepiece will not skip."""
    while len(text) > _MAX_PIECE_CHARS:
        cut = text.rfind(" ", 0, _MAX_PIECE_CHARS)
        cut = _MAX_PIECE_CHARS if cut <= 0 else cut
        yield text[:cut]
        text = text[cut:]
    if text:
        yield text


def train_sentencepiece(corpus: str | os.PathLike, out_dir: str | os.PathLike, vocab_size: int, *,
                        model_type: str = "unigram", sentinels: int = 100, field: str = "text",
                        character_coverage: float = 0.9995, input_sentence_size: int = 2_000_000,
                        seed: int = 0, num_threads: int | None = None,
                        overwrite: bool = False) -> SentencePieceTokenizer:
    """Train a SentencePiece model on a text (one document per line) or JSONL corpus.

    Ids: pad 0, eos 1, unk 2, no bos, then `<extra_id_0..sentinels-1>` and `<mask>` as
    user-defined symbols. Normalisation is the identity with no dummy prefix, no whitespace
    removal and byte fallback, so decode(encode(s)) == s for any text (spaces, newlines, tabs,
    CJK and emoji included; newline and tab become byte pieces). The corpus is streamed; at most
    `input_sentence_size` sentences, sampled with `seed`, are held for training.
    Writes `out_dir` atomically (tokenizer.model + cpmctl_tokenizer.json) and returns the tokenizer.
    """
    import sentencepiece as spm

    if model_type not in ("unigram", "bpe"):
        raise UserError(f"model_type must be 'unigram' or 'bpe', got {model_type!r}")
    if sentinels < 0:
        raise UserError(f"sentinels must be >= 0, got {sentinels}")
    reader = DocumentReader(corpus, field=field)
    check_new_output(out_dir, overwrite)  # before minutes of training, not after
    counts = {"docs": 0}
    failure: list[BaseException] = []

    def sentences() -> Iterator[str]:
        # An exception raised in here reaches sentencepiece's C++ side and comes back as a bare
        # RuntimeError; keep the real one to re-raise after training stops.
        try:
            for _, text in reader:
                counts["docs"] += 1
                yield from _training_pieces(text)
        except BaseException as exc:
            failure.append(exc)
            raise

    model = io.BytesIO()
    user_symbols = [sentinel_token(i) for i in range(sentinels)] + [MASK_TOKEN]
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(), model_writer=model, vocab_size=vocab_size, model_type=model_type,
            pad_id=SP_PAD_ID, eos_id=SP_EOS_ID, unk_id=SP_UNK_ID, bos_id=-1,
            user_defined_symbols=user_symbols, normalization_rule_name="identity",
            add_dummy_prefix=False, remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
            byte_fallback=True, split_digits=True, character_coverage=character_coverage,
            input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
            max_sentence_length=_MAX_PIECE_CHARS * 4, num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=2,  # the trainer's progress chatter; errors still come back as exceptions
        )
    except RuntimeError as exc:
        if failure:
            raise failure[0] from None
        raise _explain_training_error(exc, corpus, vocab_size, counts["docs"]) from None
    tokenizer = SentencePieceTokenizer(model.getvalue(), source=f"model trained on {corpus}")
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        tokenizer.save(tmp)
    return tokenizer


def _explain_training_error(exc: RuntimeError, corpus: Any, vocab_size: int, docs: int) -> UserError:
    message = str(exc)
    if docs == 0 or "sentences_.empty()" in message:
        return UserError(f"corpus {corpus} has no text (every line is blank); give a corpus with documents")
    if match := re.search(r"Vocabulary size is smaller than required_chars\. \d+ vs (\d+)", message):
        return UserError(f"vocab size {vocab_size} is too small: the corpus's characters, byte pieces and "
                         f"special tokens need at least {match.group(1)}; raise the vocab size")
    if match := re.search(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)", message):
        return UserError(f"vocab size {vocab_size} is too large for corpus {corpus}: it supports at most "
                         f"{match.group(1)} pieces; lower the vocab size or give more text")
    return UserError(f"sentencepiece training on {corpus} failed: {_first_line(exc)}")


# -- Hugging Face tokenizer.json ----------------------------------------------------------------
class HFTokenizer(Tokenizer):
    """A `tokenizers` tokenizer; special tokens come from the files, never from guesses.

    Precedence: special_tokens_map.json over tokenizer_config.json over what tokenizer.json
    itself says (the model's unk token, the padding token). A tokenizer with no eos token but a
    separator (BERT) uses [SEP] as eos: it is what ends a BERT sequence.
    """

    kind = "hf"
    model_file = HF_FILE

    def __init__(self, files: dict[str, bytes], *, source: str = "<memory>", meta: dict[str, Any] | None = None):
        from tokenizers import Tokenizer as RustTokenizer

        self._file_bytes = {HF_FILE: files[HF_FILE], **{k: v for k, v in files.items() if k != HF_FILE}}
        try:
            spec = json.loads(files[HF_FILE])
            self._tk = RustTokenizer.from_str(files[HF_FILE].decode("utf-8"))
        except Exception as exc:  # tokenizers raises plain Exception subclasses on bad input
            raise UserError(f"{source} is not a valid tokenizer.json ({_first_line(exc)})") from None
        # Padding and truncation settings in tokenizer.json (e.g. pad everything to 128) would
        # silently change ids; cpmctl pads and truncates itself.
        self._tk.no_padding()
        self._tk.no_truncation()
        vocab_size = self._tk.get_vocab_size(with_added_tokens=True)
        ids = _ids_from_meta(meta, source) if meta is not None else self._special_ids_from_files(spec, files, source)
        super().__init__(vocab_size=vocab_size, **ids)
        self._affixes = self._find_affixes()

    def _special_ids_from_files(self, spec: dict[str, Any], files: dict[str, bytes], source: str) -> dict[str, Any]:
        tokens: dict[str, str] = {}
        model_unk = (spec.get("model") or {}).get("unk_token")
        if model_unk:
            tokens["unk_token"] = model_unk
        padding = spec.get("padding") or {}
        if padding.get("pad_token"):
            tokens["pad_token"] = padding["pad_token"]
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            if name not in files:
                continue
            try:
                config = json.loads(files[name])
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise UserError(f"{name} beside {source} is not valid JSON ({exc})") from None
            for key in ("pad_token", "eos_token", "unk_token", "bos_token", "mask_token", "cls_token", "sep_token"):
                value = config.get(key)
                if isinstance(value, dict):
                    value = value.get("content")
                if isinstance(value, str):
                    tokens[key] = value

        def lookup(key: str) -> int | None:
            if key not in tokens:
                return None
            token_id = self._tk.token_to_id(tokens[key])
            if token_id is None:
                raise UserError(f"{source}: the {key} {tokens[key]!r} named by the tokenizer files "
                                "is not in its vocabulary")
            return token_id

        ids = {name: lookup(f"{name}_token") for name in ("pad", "eos", "unk", "bos", "mask", "cls", "sep")}
        if ids["eos"] is None:
            ids["eos"] = ids["sep"]
        sentinels: dict[int, int] = {}
        for token, token_id in self._tk.get_vocab(with_added_tokens=True).items():
            if match := _SENTINEL.fullmatch(token):
                sentinels[int(match.group(1))] = token_id
        # Only an unbroken run <extra_id_0>, <extra_id_1>, ... counts: sentinel i must be index i.
        run = []
        while len(run) in sentinels:
            run.append(sentinels[len(run)])
        return {**{f"{k}_id": v for k, v in ids.items()}, "sentinel_ids": run}

    def _find_affixes(self) -> tuple[list[int], list[int]]:
        # The post-processor's template, read off one encoding: sequence_ids is None exactly at
        # the ids the template added around the text.
        encoding = self._tk.encode("a", add_special_tokens=True)
        seq = encoding.sequence_ids
        body = [i for i, s in enumerate(seq) if s is not None]
        if not body:
            return [], []
        return encoding.ids[: body[0]], encoding.ids[body[-1] + 1:]

    def _encode_plain(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return [e.ids for e in self._tk.encode_batch(texts, add_special_tokens=False)]

    def _special_affixes(self) -> tuple[list[int], list[int]]:
        return list(self._affixes[0]), list(self._affixes[1])

    def _decode(self, ids: list[int], skip_special: bool) -> str:
        if skip_special:
            special = self.special_ids
            ids = [i for i in ids if i not in special]
        return self._tk.decode(ids, skip_special_tokens=skip_special)

    def _files(self) -> dict[str, bytes]:
        return self._file_bytes

    def id_to_token(self, token_id: int) -> str:
        token = self._tk.id_to_token(token_id)
        if token is None:
            raise UserError(f"token id {token_id} is outside the vocabulary (size {self.vocab_size})")
        return token

    def token_to_id(self, token: str) -> int | None:
        return self._tk.token_to_id(token)


# -- loading ------------------------------------------------------------------------------------
_ID_FIELDS = ("pad_id", "eos_id", "unk_id", "bos_id", "mask_id", "cls_id", "sep_id")


def _ids_from_meta(meta: dict[str, Any], source: str) -> dict[str, Any]:
    try:
        ids = {k: meta[k] for k in _ID_FIELDS}
        ids["sentinel_ids"] = list(meta["sentinel_ids"])
    except (KeyError, TypeError) as exc:
        raise UserError(f"{source}: {META_FILE} lacks {exc}; re-save the tokenizer") from None
    return ids


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read tokenizer file {path}: {exc.strerror}") from None


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer from a directory (cpmctl's tokenizer/ or a Hugging Face model directory)
    or from a `tokenizer.model` / `tokenizer.json` file."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"tokenizer path {path} does not exist")
    if path.is_file():
        if path.name == META_FILE:
            return load_tokenizer(path.parent)
        if path.suffix == ".json":
            return _load_hf(path, meta=None)
        return SentencePieceTokenizer(_read(path), source=str(path))
    meta_path = path / META_FILE
    if meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            kind, file = meta["kind"], meta["file"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise UserError(f"{meta_path} is corrupt ({exc}); re-save the tokenizer") from None
        model_path = path / file
        if not model_path.is_file():
            raise UserError(f"{meta_path} names {file}, which is missing from {path}")
        if kind == "sentencepiece":
            tokenizer: Tokenizer = SentencePieceTokenizer(_read(model_path), source=str(model_path), meta=meta)
        elif kind == "hf":
            tokenizer = _load_hf(model_path, meta=meta)
        elif kind == "cpm2":  # jieba + greedy vocab.txt lookup (the released CPM-2 tokenizer)
            from cpmctl.cpm2.tokenizer import CPM2Tokenizer

            tokenizer = CPM2Tokenizer(_read(model_path), source=str(model_path), meta=meta)
        else:
            raise UserError(f"{meta_path}: unknown tokenizer kind {kind!r}")
        if meta.get("content_hash") not in (None, tokenizer.content_hash()):
            raise UserError(f"{model_path} does not match the hash recorded in {meta_path}; the tokenizer was altered")
        return tokenizer
    # A Hugging Face directory often holds both; tokenizer.json is the one transformers uses.
    if (path / HF_FILE).is_file():
        return _load_hf(path / HF_FILE, meta=None)
    if (path / SP_FILE).is_file():
        return SentencePieceTokenizer(_read(path / SP_FILE), source=str(path / SP_FILE))
    raise UserError(f"{path} holds neither {SP_FILE} nor {HF_FILE}; point at a tokenizer directory or file")


def _load_hf(path: Path, meta: dict[str, Any] | None) -> HFTokenizer:
    files = {HF_FILE: _read(path)}
    for name in HF_SIDE_FILES:
        side = path.parent / name
        if side.is_file():
            files[name] = _read(side)
    return HFTokenizer(files, source=str(path), meta=meta)


# -- Hugging Face export ---------------------------------------------------------------------
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
# Files of a checkpoint's tokenizer/ that an exported Hugging Face directory carries unchanged.
HF_EXPORT_FILES = (HF_FILE, *HF_SIDE_FILES, CHAT_TEMPLATE_FILE)
_SPECIAL_NAMES = ("bos", "eos", "unk", "pad", "mask", "cls", "sep")


def export_hf_tokenizer(tokenizer_dir: str | os.PathLike, out: str | os.PathLike, config: Any, model_type: str, *,
                        renames: dict[str, str] | None = None) -> list[str]:
    """Write a tokenizer that transformers' AutoTokenizer loads (with only transformers and
    tokenizers installed) into the Hugging Face directory `out`; returns the file names written.

    A Hugging Face tokenizer travels as it is (tokenizer.json and its side files, chat template
    included), with a tokenizer_config.json naming its special tokens written when it had none.
    A SentencePiece model is converted to tokenizer.json by transformers' own converter
    (`SpmConverter.build_tokenizer_from_spm_proto`, which follows the model's own normaliser
    settings), with the template `cpmctl infer` uses: bos before a decoder-only prompt when
    the model has one, eos after an encoder input. The .model file is kept beside it
    (as spiece.model for T5), for tools that want the SentencePiece original.
    """
    import shutil

    src, dst = Path(tokenizer_dir), Path(out)
    renames = renames or {}
    tok = load_tokenizer(src)
    written = []
    if isinstance(tok, SentencePieceTokenizer):
        _sentencepiece_tokenizer_json(tok, config).save(str(dst / HF_FILE))
        written.append(HF_FILE)
        (dst / renames.get(SP_FILE, SP_FILE)).write_bytes(tok._bytes)
        written.append(renames.get(SP_FILE, SP_FILE))
    else:
        for name in HF_EXPORT_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, dst / renames.get(name, name))
                written.append(renames.get(name, name))
    if not (dst / TOKENIZER_CONFIG).is_file():
        settings: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": config.max_positions,
                                    "clean_up_tokenization_spaces": False}
        for name in _SPECIAL_NAMES:
            token_id = getattr(tok, f"{name}_id")
            if token_id is not None and not (name == "eos" and tok.sep_id == token_id and tok.kind == "hf"):
                settings[f"{name}_token"] = tok.id_to_token(token_id)
        (dst / TOKENIZER_CONFIG).write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        written.append(TOKENIZER_CONFIG)
    return written


def _sentencepiece_tokenizer_json(tok: SentencePieceTokenizer, config: Any):
    """A `tokenizers.Tokenizer` encoding exactly as `tok` does, through transformers' converter."""
    try:
        from tokenizers import AddedToken, processors
        from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf

        model_pb2 = import_protobuf()
    except ImportError as exc:
        raise UserError(f"exporting a SentencePiece tokenizer needs transformers and protobuf ({_first_line(exc)}); "
                        "pip install transformers protobuf") from None
    proto = model_pb2.ModelProto()
    proto.ParseFromString(tok._bytes)
    if proto.trainer_spec.model_type == 1:  # unigram
        vocab: Any = [(piece.piece, piece.score) for piece in proto.pieces]
    else:  # bpe
        vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    tk = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=False)
    if tk is None:
        raise UserError("cannot convert this SentencePiece model (neither unigram nor BPE) to tokenizer.json")
    special = sorted(tok.special_ids | ({tok.unk_id} if tok.unk_id is not None else set()))
    tk.add_special_tokens([AddedToken(tok.id_to_token(i), special=True, normalized=False) for i in special])
    # The template `cpmctl infer` applies: bos before a decoder-only prompt, eos after an encoder input.
    if config.arch == "decoder" and config.bos_token_id is not None:
        bos = tok.id_to_token(config.bos_token_id)
        tk.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, config.bos_token_id)])
    elif config.arch != "decoder" and tok.eos_id is not None:
        eos = tok.id_to_token(tok.eos_id)
        tk.post_processor = processors.TemplateProcessing(single=f"$A {eos}", pair=f"$A {eos} $B {eos}", special_tokens=[(eos, tok.eos_id)])
    return tk


def chat_template(tokenizer_dir: str | os.PathLike) -> str | None:
    """The chat template a Hugging Face tokenizer shipped with (chat_template.jinja, or the
    chat_template field of tokenizer_config.json); None when it has none."""
    directory = Path(tokenizer_dir)
    if (directory / CHAT_TEMPLATE_FILE).is_file():
        return (directory / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    if (directory / TOKENIZER_CONFIG).is_file():
        try:
            settings = json.loads((directory / TOKENIZER_CONFIG).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"{directory / TOKENIZER_CONFIG} is not valid JSON ({exc})") from None
        template = settings.get("chat_template") if isinstance(settings, dict) else None
        if isinstance(template, list):  # named templates: the default one
            template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
        return template if isinstance(template, str) else None
    return None


def render_chat(tokenizer_dir: str | os.PathLike, tok: Tokenizer, user_text: str) -> str:
    """`user_text` as one user turn through the tokenizer's chat template, ending with the
    assistant's generation prompt, rendered by transformers' own template renderer (the text
    `apply_chat_template(..., add_generation_prompt=True, tokenize=False)` gives)."""
    template = chat_template(tokenizer_dir)
    if template is None:
        raise UserError(f"the tokenizer in {tokenizer_dir} has no chat template to render chat turns with", option="chat")
    try:
        from transformers.utils.chat_template_utils import render_jinja_template
    except ImportError as exc:
        raise UserError(f"chat templates are rendered with transformers ({_first_line(exc)}); pip install transformers",
                        option="chat") from None
    special = {f"{name}_token": tok.id_to_token(getattr(tok, f"{name}_id")) for name in _SPECIAL_NAMES
               if getattr(tok, f"{name}_id") is not None}
    rendered, _ = render_jinja_template(conversations=[[{"role": "user", "content": user_text}]], chat_template=template,
                                        add_generation_prompt=True, **special)
    return rendered[0]
