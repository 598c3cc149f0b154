"""The CPM-2 tokenizer (the Chinese `vocab.txt` of the CPM-2.1 release), as its public code
(CPM-2-Finetune's tokenization_enc_dec.py) tokenizes:

1. every full-width character becomes its half-width form (U+3000 becomes a space), except the
   Chinese punctuation ，。！（）？、；： which stays;
2. jieba cuts the text into words (accurate mode, with its HMM for unknown words);
3. in each word, space and newline become the visible placeholders U+2582 and U+2583;
4. each word is split greedily into the longest vocabulary entries from the left (no "##"
   continuation marks); a character no entry starts with becomes <unk>, and a word longer than
   200 characters becomes a single <unk>.

`vocab.txt` holds one entry per line, stripped of surrounding whitespace; an entry's id is its
line number, and an entry that appears twice keeps the id of its last line (as the public
loader's dict does). Special entries: <pad>, <eod> (end of document, the eos), <unk> and the 190
sentinels <s_0> ... <s_189>. Decoding joins the entries and turns the placeholders back.

There is no export to a transformers `tokenizer.json`: step 2 is jieba's dictionary-and-HMM
segmentation, which no pre-tokenizer of the `tokenizers` library reproduces, so such a file
would give different ids.
"""

from __future__ import annotations

import logging
from typing import Any

from cpmctl.errors import UserError
from cpmctl.tokenizer_base import Tokenizer

VOCAB_FILE = "vocab.txt"
PAD, EOD, UNK = "<pad>", "<eod>", "<unk>"
MAX_SENTINELS = 190
MAX_WORD_CHARS = 200
SPACE, NEWLINE = "\u2582", "\u2583"
_PLACEHOLDERS = str.maketrans(" \n", SPACE + NEWLINE)
_KEEP_FULL_WIDTH = frozenset("，。！（）？、；：")
JIEBA_HINT = "pip install 'cpmctl[cpm2]'  (or: pip install jieba)"


def sentinel(i: int) -> str:
    return f"<s_{i}>"


def to_half_width(ch: str) -> str:
    """Full-width ASCII forms (U+FF01..U+FF5E) and the ideographic space to their ASCII forms."""
    if ch in _KEEP_FULL_WIDTH:
        return ch
    code = ord(ch)
    code = 0x20 if code == 0x3000 else code - 0xFEE0
    return chr(code) if 0x20 <= code <= 0x7E else ch


def require_jieba() -> Any:
    """The jieba module, or a UserError with the install command."""
    try:
        import jieba
    except ImportError:
        raise UserError(f"the CPM-2 tokenizer needs the jieba word segmenter, which is not installed: {JIEBA_HINT}") from None
    return jieba


def parse_vocab(data: bytes, source: str) -> list[str]:
    """The entries of a vocab.txt, one per line, by id."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{source} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    # Universal newlines, as Python's text-mode readline splits them.
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.strip() for line in lines]


class CPM2Tokenizer(Tokenizer):
    kind = "cpm2"
    model_file = VOCAB_FILE

    def __init__(self, vocab_bytes: bytes, *, source: str = "<memory>", meta: dict[str, Any] | None = None):
        self._bytes = vocab_bytes
        self.entries = parse_vocab(vocab_bytes, source)
        self.ids = {token: i for i, token in enumerate(self.entries)}  # a repeated entry keeps its last id
        missing = [t for t in (PAD, EOD, UNK, *(sentinel(i) for i in range(MAX_SENTINELS))) if t not in self.ids]
        if missing:
            raise UserError(f"{source} is not a CPM-2 vocabulary: it has no {missing[0]}"
                            + (f" (and {len(missing) - 1} more special entries)" if len(missing) > 1 else ""))
        super().__init__(
            vocab_size=len(self.entries), pad_id=self.ids[PAD], eos_id=self.ids[EOD], unk_id=self.ids[UNK],
            sentinel_ids=[self.ids[sentinel(i)] for i in range(MAX_SENTINELS)],
        )
        self._longest = max((len(t) for t in self.ids), default=1)
        self._segmenter = None

    def _jieba(self):
        if self._segmenter is None:
            jieba = require_jieba()
            # jieba announces building its prefix dictionary on stderr at DEBUG level.
            logging.getLogger("jieba").setLevel(logging.WARNING)
            self._segmenter = jieba.Tokenizer()
        return self._segmenter

    def words(self, text: str) -> list[str]:
        """Steps 1-3: the text's words with their placeholders."""
        text = "".join(to_half_width(ch) for ch in text)
        return [w.translate(_PLACEHOLDERS) for w in self._jieba().cut(text, cut_all=False)]

    def pieces(self, word: str) -> list[str]:
        """Step 4: greedy longest-match-first split of one word."""
        if len(word) > MAX_WORD_CHARS:
            return [UNK]
        out, start = [], 0
        while start < len(word):
            # Longer candidates than the longest entry can never match; skipping them changes nothing.
            end = min(len(word), start + self._longest)
            while end > start and word[start:end] not in self.ids:
                end -= 1
            if end == start:
                out.append(UNK)
                start += 1
            else:
                out.append(word[start:end])
                start = end
        return out

    def tokenize(self, text: str) -> list[str]:
        return [piece for word in self.words(text) for piece in self.pieces(word)]

    def _encode_plain(self, texts: list[str]) -> list[list[int]]:
        return [[self.ids[piece] for piece in self.tokenize(text)] for text in texts]

    def _special_affixes(self) -> tuple[list[int], list[int]]:
        return [], []  # the public encode adds nothing around a text

    def _decode(self, ids: list[int], skip_special: bool) -> str:
        special = self.special_ids if skip_special else set()
        text = "".join(self.id_to_token(i) for i in ids if i not in special)
        return text.replace(SPACE, " ").replace(NEWLINE, "\n")

    def _files(self) -> dict[str, bytes]:
        return {VOCAB_FILE: self._bytes}

    def id_to_token(self, token_id: int) -> str:
        if not 0 <= token_id < len(self.entries):
            raise UserError(f"token id {token_id} is outside the vocabulary (0..{len(self.entries) - 1})")
        return self.entries[token_id]

    def token_to_id(self, token: str) -> int | None:
        return self.ids.get(token)
