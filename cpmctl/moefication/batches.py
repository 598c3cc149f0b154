"""Model-input batches of token rows (documents) for MoEfication's passes over the dense and MoE models."""

from __future__ import annotations

from typing import Any

import torch

from cpmctl.data import EpochBatches, pad_rows


def encode_documents(texts: list[str], tok, config, seq_len: int) -> list[list[int]]:
    """Token rows of documents as the model reads them: an encoder's with its special tokens, a
    decoder's after its bos token and with eos; at most `seq_len` (and the position table) long."""
    limit = min(seq_len, config.max_positions) if config.position == "absolute" else seq_len
    if config.arch == "encoder":
        return [row for row in tok.encode_many(texts, add_special=True, max_length=limit) if row]
    rows = tok.encode_many(texts, add_eos=True)
    if config.arch == "decoder" and config.bos_token_id is not None:
        rows = [[config.bos_token_id] + row for row in rows]
    return [row[:limit] for row in rows if len(row) >= 2]


def length_sorted(rows: list[list[int]], size: int):
    """Batches of `size` rows in order of length (little padding), for passes without training."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    for start in range(0, len(order), size):
        yield [rows[i] for i in order[start : start + size]]


def model_inputs(config, rows: list[list[int]]) -> dict[str, Any]:
    """Forward inputs for a batch of documents: encoders and decoders read the document itself
    (an encoder-decoder's decoder reads it teacher-forced after the start token)."""
    ids, mask = pad_rows(rows, config.pad_token_id)
    if config.arch == "encoder-decoder":
        start = torch.full((ids.shape[0], 1), config.start_token_id, dtype=torch.long)
        return dict(input_ids=ids, attention_mask=mask, decoder_input_ids=torch.cat([start, ids[:, :-1]], 1),
                    decoder_attention_mask=mask)
    return dict(input_ids=ids, attention_mask=mask)


def real_tokens(stack: str, inputs: dict[str, Any]):
    """Bool mask of the real (non-padding) tokens that `stack`'s FFNs see in `inputs`."""
    return inputs["decoder_attention_mask" if stack == "decoder" and "decoder_attention_mask" in inputs else "attention_mask"].bool()


def lm_targets(config, logits, inputs: dict[str, Any]):
    """(logits, labels) of a document batch's LM loss: a decoder predicts each next token, an
    encoder-decoder's decoder its (teacher-forced) document; padding is ignored (-100)."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    if config.arch == "decoder":
        return logits[:, :-1], ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return logits, ids.masked_fill(mask == 0, -100)


class RowBatches(EpochBatches):
    """Model-input batches of token rows, reshuffled every epoch by (seed + epoch), endless;
    resumable. The last partial batch of an epoch is dropped (one batch at least)."""

    def __init__(self, rows: list[list[int]], config, batch_size: int, seed: int) -> None:
        self.rows, self.config, self.batch_size, self.seed = rows, config, batch_size, seed
        self.epoch = self.position = 0
        self._order: tuple[int, list[int]] | None = None  # (epoch, its order): one shuffle per epoch

    @property
    def batches_per_epoch(self) -> int:
        return max(1, len(self.rows) // self.batch_size)

    def batch_at(self, epoch: int, position: int) -> dict[str, Any]:
        if self._order is None or self._order[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._order = (epoch, torch.randperm(len(self.rows), generator=generator).tolist())
        start = position * self.batch_size
        return model_inputs(self.config, [self.rows[i] for i in self._order[1][start : start + self.batch_size]])
