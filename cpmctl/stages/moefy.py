"""`cpmctl moefy`: turn dense FFNs into experts with routers that run only the chosen ones.

    cpmctl moefy ./minilm ./minilm-moe --experts 48 --ratio 0.25 --router mlp --data corpus.txt
    cpmctl moefy ./minilm-moe ./minilm-dense --restore

Steps: sample documents from --data (a bounded reservoir; a held-out part is kept for the
report), run the dense model once while FFN inputs stream into a fixed-size reservoir per layer,
split each FFN's neurons into equal experts (cluster / coactivation / random), permute them into
contiguous blocks, build the router (center / mlp trained on the reservoir / oracle) and write the
MoE checkpoint with the permutation, so `--restore` gives the exact dense checkpoint back. The
report (rich table, report.json in OUT, and the checkpoint's metrics) gives per-layer router
recall and executed FFN compute fraction, and dense-vs-MoE quality on the held-out documents.

    cpmctl moefy ./lm ./lm-moe --expert-size 32 --data corpus.txt --task dev.jsonl --verbalizer words.json
    cpmctl moefy ./distilled ./distilled-moe --experts 48 --data corpus.txt --task dev.jsonl

`--task FILE.jsonl` (cpmctl.tasks format: text, optional text_pair, label) adds dense vs MoE
accuracy and macro-F1 at the chosen ratio. Classes are scored as the checkpoint was trained to:
with its linear task head when it is a task model (`cpmctl distill` OUT or OUT/checkpoint, whose
task.json and head.safetensors the MoE checkpoint carries along; or `cpmctl prompt-tune --full`
OUT), otherwise by each label word's log-probability under the LM head (--verbalizer, as in
prompt-tune). An encoder with neither head is refused (exit 2): mean-pooled embeddings are not
class scores.
"""

from __future__ import annotations

import json
import logging
import os
import random
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cpmctl.command_configs import MoefyConfig  # the options, declared once
from cpmctl.errors import UserError

log = logging.getLogger("cpmctl")

REPORT_FILE = "report.json"


# -- layout decisions ---------------------------------------------------------------------------------
def expert_layout(d_ff: int, experts: int | None, expert_size: int | None, allow_uneven: bool) -> tuple[int, int]:
    """(E, d_e) with E * d_e >= d_ff; uneven splits (zero-padded experts) need allow_uneven."""
    if experts is not None:
        if experts > d_ff:
            raise UserError(f"--experts {experts} is more than the FFN's {d_ff} neurons")
        size = -(-d_ff // experts)
    else:
        if expert_size > d_ff:
            raise UserError(f"--expert-size {expert_size} is more than the FFN's {d_ff} neurons")
        size = expert_size
        experts = -(-d_ff // size)
    if experts * size != d_ff:
        if not allow_uneven:
            raise UserError(
                f"d_ff {d_ff} does not split evenly into {experts} experts of {size} neurons; "
                "choose a divisor or pass --allow-uneven (the last experts get zero padding)"
            )
        if experts * size - d_ff >= size:
            raise UserError(f"{experts} experts of {size} neurons leave a whole expert empty for d_ff {d_ff}; use fewer experts")
    return experts, size


def ffn_names(config) -> list[str]:
    names = []
    if config.has_encoder:
        names += [f"encoder.{i}" for i in range(config.blocks_in_stack("encoder"))]
    if config.has_decoder:
        names += [f"decoder.{i}" for i in range(config.blocks_in_stack("decoder"))]
    return names


def choose_layers(config, layers: list[str] | None) -> list[str]:
    known = ffn_names(config)
    if not layers:
        return known
    unknown = [name for name in layers if name not in known]
    if unknown:
        raise UserError(f"unknown layer {unknown[0]!r} in --layers; this model has {', '.join(known)}")
    return [name for name in known if name in layers]


# -- data ----------------------------------------------------------------------------------------------
def _sample_texts(path: Path, count: int, field: str, seed: int) -> list[str]:
    """A uniform sample of `count` documents of a text/JSONL corpus (reservoir: bounded memory).

    Li's algorithm L: instead of a random draw per document, it draws how many documents to
    skip before the next replacement, so a corpus of n documents costs O(count log(n/count))
    draws, not n."""
    import math

    from cpmctl.corpus import read_documents

    if count < 1:
        return []
    rng = random.Random(seed)

    def unit() -> float:  # uniform in (0, 1): logarithms need it above 0
        u = rng.random()
        return u if u > 0 else unit()

    sample: list[str] = []
    w = math.exp(math.log(unit()) / count)
    replace_at = count + int(math.log(unit()) / math.log1p(-w))
    for seen, text in enumerate(read_documents(path, field=field)):
        if seen < count:
            sample.append(text)
        elif seen == replace_at:
            sample[rng.randrange(count)] = text
            w *= math.exp(math.log(unit()) / count)
            replace_at += 1 + int(math.log(unit()) / math.log1p(-w))
    rng.shuffle(sample)
    return sample


def _encode(texts: list[str], tok, config, seq_len: int) -> list[list[int]]:
    limit = min(seq_len, config.max_positions) if config.position == "absolute" else seq_len
    if config.arch == "encoder":
        return [row for row in tok.encode_many(texts, add_special=True, max_length=limit) if row]
    rows = tok.encode_many(texts, add_eos=True)
    if config.arch == "decoder" and config.bos_token_id is not None:
        rows = [[config.bos_token_id] + row for row in rows]
    return [row[:limit] for row in rows if len(row) >= 2]


def load_documents(cfg: MoefyConfig, config, checkpoint: Path) -> tuple[list[list[int]], list[list[int]], Any]:
    """(train rows, held-out rows, tokenizer) of token ids; text corpora need the checkpoint's tokenizer."""
    from cpmctl.tokenizer import load_tokenizer

    tok = load_tokenizer(checkpoint / "tokenizer") if (checkpoint / "tokenizer").is_dir() else None
    if cfg.data is None:
        return [], [], tok
    if not cfg.data.exists():
        raise UserError(f"--data {cfg.data} does not exist")
    held = 0 if cfg.eval_data is not None else cfg.eval_docs
    if cfg.data.is_dir():
        import numpy as np

        from cpmctl.data import TokenShards

        shards = TokenShards(cfg.data)
        order = np.random.default_rng(cfg.seed).permutation(len(shards))[: cfg.max_docs + held]
        rows = [shards.document(int(i)).astype(np.int64).tolist()[: cfg.seq_len] for i in order]
        rows = [r for r in rows if len(r) >= 2]
    else:
        if tok is None:
            raise UserError(f"checkpoint {checkpoint} has no tokenizer/ to read the text in --data; give prepared shards")
        rows = _encode(_sample_texts(cfg.data, cfg.max_docs + held, cfg.field, cfg.seed), tok, config, cfg.seq_len)
    train, held_out = rows[held:], rows[:held]
    if cfg.eval_data is not None:
        if tok is None:
            raise UserError(f"checkpoint {checkpoint} has no tokenizer/ to read --eval-data")
        held_out = _encode(_sample_texts(cfg.eval_data, cfg.eval_docs, cfg.field, cfg.seed), tok, config, cfg.seq_len)
    tokens = sum(len(r) for r in train)
    if tokens < cfg.min_tokens or not held_out:
        raise UserError(
            f"--data {cfg.data} is too small: {len(train)} documents, {tokens} tokens for training the router "
            f"(need at least {cfg.min_tokens}) and {len(held_out)} held out for the report; give more text"
        )
    return train, held_out, tok


def _batches(rows: list[list[int]], size: int):
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    for start in range(0, len(order), size):
        yield [rows[i] for i in order[start : start + size]]


def _pad(rows: list[list[int]], pad_id: int):
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


def _model_inputs(config, rows: list[list[int]]) -> dict[str, Any]:
    """Forward inputs for a batch of documents: encoders and decoders read the document itself
    (an encoder-decoder's decoder reads it teacher-forced after the start token)."""
    import torch

    ids, mask = _pad(rows, config.pad_token_id)
    if config.arch == "encoder-decoder":
        start = torch.full((ids.shape[0], 1), config.start_token_id, dtype=torch.long)
        return dict(input_ids=ids, attention_mask=mask, decoder_input_ids=torch.cat([start, ids[:, :-1]], 1),
                    decoder_attention_mask=mask)
    return dict(input_ids=ids, attention_mask=mask)


def _real_tokens(stack: str, inputs: dict[str, Any]):
    return inputs["decoder_attention_mask" if stack == "decoder" and "decoder_attention_mask" in inputs else "attention_mask"].bool()


class _AllRecorded(Exception):
    """Every recorded FFN has seen the batch: the rest of the forward pass is not needed."""


def collect_inputs(model, rows: list[list[int]], layers: list[str], cfg: MoefyConfig, *, stop_early: bool = True) -> dict[str, Any]:
    """Run the dense model over `rows`; returns a reservoir sample of each layer's FFN inputs.

    The forward pass stops once the last recorded FFN has its input: later layers and, for
    LMs, the LM head over the whole vocabulary would be computed for nothing. (With shared
    layers one FFN runs several times per pass, so there the pass runs to the end.)"""
    import torch

    from cpmctl.moefication import FFNInputRecorder

    ffns = {f"{stack}.{i}": ffn for stack, i, ffn in model.ffn_modules() if f"{stack}.{i}" in layers}
    by_stack: dict[str, dict[str, Any]] = {}
    for name, ffn in ffns.items():
        by_stack.setdefault(name.split(".")[0], {})[name] = ffn
    recorders = {stack: FFNInputRecorder(group, cfg.max_tokens, seed=cfg.seed) for stack, group in by_stack.items()}
    seen = [0]

    def stop_when_all_recorded(module, args):  # registered after the recorders' hooks: runs after them
        seen[0] += 1
        if seen[0] == len(ffns):
            raise _AllRecorded

    stoppers = [] if model.config.share_layers or not stop_early else [f.register_forward_pre_hook(stop_when_all_recorded) for f in ffns.values()]
    try:
        with torch.no_grad():
            for batch in _batches(rows, cfg.batch_size):
                inputs = _model_inputs(model.config, batch)
                for stack, recorder in recorders.items():
                    recorder.keep = _real_tokens(stack, inputs)
                seen[0] = 0
                try:
                    model(**inputs)
                except _AllRecorded:
                    pass
    finally:
        for handle in stoppers:
            handle.remove()
        for recorder in recorders.values():
            recorder.close()
    return {name: rec.reservoirs[name].sample() for rec in recorders.values() for name in rec.reservoirs}


# -- building the MoE layers ---------------------------------------------------------------------------
@dataclass
class NeuronSample:
    """One FFN's neuron activations on the first sampled inputs (dense neuron order), computed
    once for both the co-activation split and the fill of skipped experts."""

    hidden: Any  # [rows, d_ff]
    median: Any  # [d_ff]: each neuron's median activation, robust to the few huge ones


def neuron_sample(ffn, inputs, rows: int = 8192) -> NeuronSample:
    import torch

    with torch.no_grad():
        hidden = ffn.hidden(inputs[:rows])
        return NeuronSample(hidden, hidden.median(dim=0).values)


def split_layer(ffn, sample: NeuronSample | None, experts: int, size: int, split: str, seed: int, profile_tokens: int = 4096):
    """The permutation [E * d_e] of one FFN's neurons into experts."""
    import torch

    from cpmctl import moefication as mf

    d_ff = ffn.w_in.weight.shape[0]
    if split == "random":
        labels = mf.random_partition(d_ff, experts, size, seed=seed)
    elif split == "cluster":
        rows = (ffn.w_gate if ffn.w_gate is not None else ffn.w_in).weight.detach()
        labels = mf.balanced_kmeans(rows, experts, size, seed=seed)
    else:
        with torch.no_grad():
            profiles = mf.activation_profiles(sample.hidden[:profile_tokens], sample.median, ffn.w_out.weight.norm(dim=0))
        labels = mf.coactivation_partition(profiles, experts, size, seed=seed)
    return mf.perm_from_labels(labels, experts, size)


def typical_activations(sample: NeuronSample, moe):
    """Median activation of every expert neuron [E, d_e] from the dense-order sample, through
    the layer's permutation (0 for the zero padding of uneven splits: its activation is 0)."""
    perm = moe.perm
    return (sample.median.index_select(0, perm.clamp(min=0)) * (perm >= 0)).view(moe.num_experts, moe.expert_size)


def init_router(moe, router: str, inputs):
    """Set the router's parameters from the expert centres; for the MLP router, returns its
    training targets (each expert's activation mass on the sampled inputs), else None."""
    from cpmctl import moefication as mf

    if router == "oracle":
        return None
    centres = mf.expert_centres(moe).to(moe.w_in.dtype)
    if router == "center":
        moe.router.weight.data.copy_(centres)
        return None
    moe.router.init_from_centres(centres)
    return mf.router_targets(mf.expert_mass(moe, inputs))


def train_routers(moes: dict[str, Any], inputs: dict[str, Any], targets: dict[str, Any], cfg: MoefyConfig) -> dict[str, dict[str, Any]]:
    """Train every layer's MLP router together (see `train_mlp_routers`); per-layer statistics."""
    from cpmctl import moefication as mf

    names = list(targets)
    if not names:
        return {}
    curves = mf.train_mlp_routers([moes[n].router for n in names], [inputs[n] for n in names], [targets[n] for n in names],
                                  epochs=cfg.epochs, seed=cfg.seed, max_steps=cfg.router_steps)
    return {n: {"router_loss_first": round(c[0], 5), "router_loss_last": round(c[-1], 5), "router_examples": int(inputs[n].shape[0])}
            for n, c in zip(names, curves)}


# -- calibration ---------------------------------------------------------------------------------------
class RowBatches:
    """Model-input batches of token rows, reshuffled every epoch, endless; resumable."""

    def __init__(self, rows: list[list[int]], config, batch_size: int, seed: int) -> None:
        self.rows, self.config, self.batch_size, self.seed = rows, config, batch_size, seed
        self.epoch = self.position = 0

    def __iter__(self):
        import torch

        per_epoch = max(1, len(self.rows) // self.batch_size)
        while True:
            order = torch.randperm(len(self.rows), generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
            while self.position < per_epoch:
                start = self.position * self.batch_size
                self.position += 1
                yield _model_inputs(self.config, [self.rows[i] for i in order[start : start + self.batch_size]])
            self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def _pooled(hidden, mask):
    weights = mask.to(hidden.dtype)[..., None]
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


def calibrate(model, teacher, rows: list[list[int]], cfg: MoefyConfig, work: Path) -> dict[str, Any]:
    """Fine-tune the MoE layers' down projections (w_out, b_out, as the paper re-tunes W2) with
    the routers active, through the shared training loop. Encoders match the dense model's
    mean-pooled embeddings (1 - cosine); LMs minimise their own LM loss on the data."""
    import torch
    import torch.nn.functional as F

    from cpmctl.losses import lm_loss
    from cpmctl.training import TrainConfig, Trainer

    config = model.config

    def loss_fn(m, batch):
        if config.arch == "encoder":
            with torch.no_grad():
                target = _pooled(teacher.encode(batch["input_ids"], batch["attention_mask"]), batch["attention_mask"])
            got = _pooled(m.encode(batch["input_ids"], batch["attention_mask"]), batch["attention_mask"])
            loss = (1 - F.cosine_similarity(got, target, dim=-1)).mean()
            return loss, {"count": int(batch["input_ids"].shape[0])}
        logits = m(**batch)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if config.arch == "decoder":
            labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            logits = logits[:, :-1]
        else:
            labels = ids.masked_fill(mask == 0, -100)
        return lm_loss(logits, labels), {"count": int((labels != -100).sum())}

    def trainable(name: str) -> bool:
        parts = name.split(".")
        return len(parts) >= 2 and parts[-2] == "ffn" and parts[-1] in ("w_out", "b_out")

    trainer = Trainer(TrainConfig(out=work, max_steps=cfg.calibrate, lr=cfg.calibrate_lr, schedule="linear",
                                  warmup_steps=max(1, cfg.calibrate // 10), seed=cfg.seed, cpu=True, progress=False,
                                  log_every=max(1, cfg.calibrate // 5)))
    result = trainer.fit(model, loss_fn, RowBatches(rows, config, cfg.batch_size, cfg.seed), trainable=trainable)
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    return {"steps": result.step, "last_loss": round(result.last_train.get("loss", float("nan")), 5)}


# -- evaluation ----------------------------------------------------------------------------------------
class RecallMeter:
    """Forward hooks on MoE layers: per layer, mean router recall over real tokens and executed
    compute (token-expert pairs x d_e over tokens x d_ff)."""

    def __init__(self, moes: dict[str, Any], d_ff: int) -> None:
        self.moes, self.d_ff = moes, d_ff
        self.sums = {name: [0.0, 0] for name in moes}
        self.keep = {}
        self.handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in moes.items()]
        for m in moes.values():
            m.counts = [0, 0]

    def _hook(self, name: str):
        import torch

        from cpmctl.moefication import recall

        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1])
            keep = self.keep.get(name.split(".")[0])
            if keep is not None and keep.numel() == x.shape[0]:
                x = x[keep.reshape(-1)]
            with torch.no_grad():
                selected, _ = module.route(x)
                r = recall(module.expert_scores(x), selected)
            self.sums[name][0] += float(r.sum())
            self.sums[name][1] += r.numel()

        return hook

    def results(self) -> dict[str, dict[str, float]]:
        out = {}
        for name, m in self.moes.items():
            total, count = self.sums[name]
            tokens, pairs = m.counts
            out[name] = {
                "recall": round(total / max(1, count), 4),
                "compute_fraction": round(pairs * m.expert_size / max(1, tokens * self.d_ff), 4),
                "experts": m.num_experts, "top_k": m.top_k,
            }
        return out

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def evaluate(model, rows: list[list[int]], cfg: MoefyConfig, tok, meter: RecallMeter | None = None) -> dict[str, Any]:
    """Sentence embeddings (encoders) or LM loss (models with an LM head) on held-out rows."""
    import math

    import torch

    from cpmctl.losses import lm_loss

    config = model.config
    embeddings, loss_sum, loss_count = [], 0.0, 0
    with torch.no_grad():
        for batch in _batches(rows, cfg.batch_size):
            inputs = _model_inputs(config, batch)
            if meter is not None:
                meter.keep = {stack: _real_tokens(stack, inputs) for stack in ("encoder", "decoder")}
            if config.arch == "encoder":
                from cpmctl.generate import embed

                embeddings.append((batch, embed(model, inputs["input_ids"], inputs["attention_mask"])))
                continue
            if config.arch == "decoder":
                ids, mask = inputs["input_ids"], inputs["attention_mask"]
                labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
                logits = model(**inputs)[:, :-1]
            else:
                ids, mask = inputs["input_ids"], inputs["attention_mask"]
                labels = ids.masked_fill(mask == 0, -100)
                logits = model(**inputs)
            n = int((labels != -100).sum())
            loss_sum += float(lm_loss(logits, labels)) * n
            loss_count += n
    if config.arch == "encoder":
        # Back to the original row order so dense and MoE vectors pair up.
        vectors = {}
        for batch, vecs in embeddings:
            for row, vec in zip(batch, vecs):
                vectors.setdefault(tuple(row), vec)
        return {"embeddings": torch.stack([vectors[tuple(r)] for r in rows])}
    return {"loss": loss_sum / max(1, loss_count), "perplexity": math.exp(min(50.0, loss_sum / max(1, loss_count)))}


def quality(dense: dict[str, Any], moe: dict[str, Any]) -> dict[str, Any]:
    import torch.nn.functional as F

    if "embeddings" in dense:
        cos = F.cosine_similarity(dense["embeddings"], moe["embeddings"], dim=-1)
        return {"metric": "embedding cosine", "mean_cosine": round(float(cos.mean()), 5), "min_cosine": round(float(cos.min()), 5)}
    return {
        "metric": "perplexity", "dense_perplexity": round(dense["perplexity"], 4), "moe_perplexity": round(moe["perplexity"], 4),
        "perplexity_increase": round(moe["perplexity"] / dense["perplexity"] - 1, 5),
    }


# -- task accuracy (--task) ----------------------------------------------------------------------------
@dataclass
class TaskSet:
    """A --task file encoded for this model, and how its classes are scored."""

    path: Path
    rows: list          # tasks.EncodedExample, one per example
    labels: Any         # tasks.LabelSet
    scoring: str        # "lm": label words by the LM head; "linear": the checkpoint's own task head
    label_ids: list[list[int]] | None
    head: Any           # tasks.LinearHead (linear scoring) or None
    pad_id: int


def resolve_checkpoint(given: Path) -> Path:
    """The checkpoint directory inside what the user named: itself, a distill run directory
    (OUT/checkpoint) or a `prompt-tune --full` output (OUT/model)."""
    from cpmctl.stages.distill import resolve_task_model

    return resolve_task_model(given) if given.is_dir() else given


def _task_model(given: Path, checkpoint: Path):
    """The task model (head, labels, words, scoring) when the checkpoint carries a task head or
    label words (distill's task.json, or a `prompt-tune --full` output), else None."""
    from cpmctl.stages.distill import TASK_FILE, load_task_model

    if not (checkpoint / TASK_FILE).is_file() and checkpoint == given:
        return None
    return load_task_model(given)


def prepare_task(cfg: MoefyConfig, model, given: Path, checkpoint: Path, tok) -> TaskSet:
    """Read, label and encode --task before any work, so a bad file costs nothing.

    Classes are scored as the checkpoint was trained to: by its linear task head when it carries
    one; otherwise by the log-probability of each label word (--verbalizer, else the task
    model's words, else the label itself) under the LM head. An encoder-only model with neither
    has nothing that could answer the task (its pooled embeddings are not class scores)."""
    from cpmctl import tasks
    from cpmctl.stages.prompt_tune import encode_for, subsample

    if tok is None:
        raise UserError(f"checkpoint {checkpoint} has no tokenizer/ to read --task {cfg.task}")
    examples = subsample(tasks.load_examples(cfg.task), cfg.max_task_examples, cfg.seed)
    verbalizer = tasks.load_verbalizer(cfg.verbalizer) if cfg.verbalizer else None
    found = _task_model(given, checkpoint)
    head = None
    if found is not None and found.head is not None:
        if verbalizer is not None:
            raise UserError(f"--verbalizer names label words for LM scoring, but {given} scores its task with a linear head")
        labels = tasks.LabelSet(tuple(found.labels), tuple(found.words))
        head = found.head.float().eval()
        scoring = "linear"
    else:
        if model.lm_head is None:
            raise UserError(
                f"--task needs class scores, and {given} has neither an LM head (to score label words) nor a task head: "
                "give a task model (cpmctl distill OUT, or cpmctl prompt-tune --full --head linear OUT) fine-tuned on this task"
            )
        if verbalizer is None and found is not None and found.labels is not None:
            verbalizer = dict(zip(found.labels, found.words))
        labels = tasks.LabelSet.from_examples(examples, verbalizer)
        scoring = "lm"
    label_ids = tasks.label_token_ids(tok, labels.words) if scoring == "lm" else None
    rows = encode_for(tok, model.config, examples, labels, scoring=scoring, plan=None, max_length=None, what="task")
    tasks.Scorer(model, label_ids=label_ids, head=head)  # refuses label words it cannot score, now
    return TaskSet(Path(cfg.task), rows, labels, scoring, label_ids, head, tok.pad_id)


def evaluate_task(model, task: TaskSet, batch_size: int) -> dict[str, Any]:
    """Accuracy, macro-F1 and predictions of `model` on the task (tasks.evaluate)."""
    from cpmctl import tasks

    scorer = tasks.Scorer(model, label_ids=task.label_ids, head=task.head).eval()
    return tasks.evaluate(scorer, tasks.eval_batches(task.rows, batch_size, task.pad_id), len(task.labels))


def task_quality(task: TaskSet, dense: dict[str, Any], moe: dict[str, Any]) -> dict[str, Any]:
    agree = sum(a == b for a, b in zip(dense["predictions"], moe["predictions"])) / max(1, len(dense["predictions"]))
    return {
        "file": str(task.path), "examples": dense["examples"], "classes": len(task.labels), "scoring": task.scoring,
        "dense_accuracy": dense["accuracy"], "moe_accuracy": moe["accuracy"],
        "dense_macro_f1": dense["macro_f1"], "moe_macro_f1": moe["macro_f1"], "agreement": agree,
    }


# -- the stage -----------------------------------------------------------------------------------------
@dataclass
class MoeLayout:
    experts: int
    expert_size: int
    top_k: int
    ratio: float
    layers: list[str]


def moe_layout(cfg: MoefyConfig, config, checkpoint: Path) -> MoeLayout:
    """Experts, their size, k and the layers to split, checked against the dense config; and
    OUT must be free (or --force)."""
    from cpmctl import moefication as mf

    if config.moe is not None:
        raise UserError(f"{checkpoint} is already a MoE model; MoEfy its dense parent, or restore it with --restore")
    experts, size = expert_layout(config.d_ff, cfg.experts, cfg.expert_size, cfg.allow_uneven)
    ratio = cfg.ratio if (cfg.ratio is not None or cfg.top_k is not None) else 0.2
    top_k = mf.top_k_for(experts, top_k=cfg.top_k, ratio=ratio)
    if top_k > experts:
        raise UserError(f"--top-k {top_k} is more than the {experts} experts")
    layers = choose_layers(config, cfg.layers)
    if os.path.exists(cfg.out) and not cfg.overwrite:
        raise UserError(f"output {cfg.out} already exists; choose a new path or pass --force")
    return MoeLayout(experts, size, top_k, ratio, layers)


def moe_output_config(cfg: MoefyConfig, config, layout: MoeLayout, *, fill_skipped: bool):
    """The MoE config the run writes. `fill_skipped`: activation statistics were collected
    (there is --data), so skipped experts contribute their typical output."""
    return config.replace(moe=dict(
        experts=layout.experts, expert_size=layout.expert_size, top_k=layout.top_k, router=cfg.router,
        layers=None if layout.layers == ffn_names(config) else layout.layers, permuted=True, ratio=layout.ratio,
        fill_skipped=fill_skipped,
    ))


def _check_restore(cfg: MoefyConfig, checkpoint: Path, config) -> None:
    if config.moe is None:
        raise UserError(f"{checkpoint} is not a MoE model; nothing to restore")
    if not config.moe.permuted:
        raise UserError(f"{checkpoint} stores no neuron permutation (not made by moefy); it cannot be restored to a dense model")
    if os.path.exists(cfg.out) and not cfg.overwrite:
        raise UserError(f"output {cfg.out} already exists; choose a new path or pass --force")


def plan(cfg: MoefyConfig, *, stand_ins=None):
    """What `run(cfg)` would write and hold in memory, from the checkpoint's config alone."""
    from cpmctl.plan import checkpoint_config, dtype_bytes, make_plan, meta_model, parameter_count, source_note, stored_dtype

    from cpmctl.stages.distill import planned_model_dir

    cfg.validate()
    checkpoint = planned_model_dir(Path(cfg.checkpoint), stand_ins)
    config = checkpoint_config(checkpoint, stand_ins)
    notes: list[str | None] = [source_note(checkpoint, "checkpoint", stand_ins)]
    dense_params = parameter_count(meta_model(config))
    if cfg.restore:
        _check_restore(cfg, checkpoint, config)
        out_config = config.replace(moe=None)
        itemsize = dtype_bytes(stored_dtype(checkpoint))
        out_params = parameter_count(meta_model(out_config))
        return make_plan("moefy", output=Path(cfg.out), output_config=out_config, parameters=dense_params, trainable=0,
                         parameter_bytes=dense_params * itemsize, devices=1,
                         breakdown={"weights": dense_params * itemsize, "output weights": out_params * itemsize},
                         steps=None, tokens=None, notes=notes, details={"restore": "MoE -> dense, neurons un-permuted"})
    layout = moe_layout(cfg, config, checkpoint)
    if cfg.data is not None and not Path(cfg.data).exists():
        notes.append(f"--data {cfg.data}: not there yet")
    out_config = moe_output_config(cfg, config, layout, fill_skipped=cfg.data is not None)
    moe_model = meta_model(out_config)
    router_params = sum(p.numel() for name, p in moe_model.named_parameters() if ".router." in name)
    # The run works in fp32: the dense model (its FFNs become the experts in place) and the routers.
    breakdown = {"weights": 4 * dense_params, "routers": 4 * max(parameter_count(moe_model) - dense_params, 0)}
    if cfg.data is not None:
        breakdown["router-training sample"] = cfg.max_tokens * config.d_model * 4 * len(layout.layers)
    if cfg.calibrate:
        breakdown["teacher"] = 4 * dense_params
        notes.append(f"--calibrate {cfg.calibrate}: a dense fp32 teacher copy beside the MoE model")
    trainable = router_params if cfg.router == "mlp" else 0
    tokens = None
    if cfg.data is not None:
        tokens = min(cfg.max_docs * cfg.seq_len, cfg.max_tokens)
        notes.append(f"tokens: FFN inputs kept per layer (at most max_docs x seq_len, capped by --max-tokens)")
    return make_plan(
        "moefy", output=Path(cfg.out), output_config=out_config, parameters=dense_params, trainable=trainable,
        parameter_bytes=4 * dense_params, devices=1, breakdown=breakdown,
        steps=cfg.epochs if cfg.router == "mlp" and cfg.data is not None else None, tokens=tokens, notes=notes,
        details={"experts": f"{layout.experts} x {layout.expert_size} neurons, top-{layout.top_k} (ratio {layout.ratio})",
                 "layers": f"all {len(layout.layers)} FFNs" if layout.layers == ffn_names(config) else ", ".join(layout.layers),
                 "split": cfg.split, "router": cfg.router,
                 "steps": "router training epochs" if cfg.router == "mlp" and cfg.data is not None else "-"},
    )


def run(cfg: MoefyConfig) -> dict[str, Any]:
    cfg.validate()
    if cfg.restore:
        return restore(cfg)
    import torch

    from cpmctl.checkpoint import load_model, read_config
    from cpmctl.moe import moe_from_dense, resolve_kernels, set_kernels

    started = time.perf_counter()
    given = Path(cfg.checkpoint)
    checkpoint = resolve_checkpoint(given)
    config = read_config(checkpoint)
    layout = moe_layout(cfg, config, checkpoint)
    experts, size, top_k, ratio, layers = layout.experts, layout.expert_size, layout.top_k, layout.ratio, layout.layers
    train_rows, eval_rows, tok = load_documents(cfg, config, checkpoint)

    torch.manual_seed(cfg.seed)
    model, ckpt = load_model(checkpoint, dtype=torch.float32)
    stored_dtype = _dominant(ckpt.dtype_summary())
    kernels = resolve_kernels(cfg.kernels, next(model.parameters()).device)  # refused now, not after the work
    task = prepare_task(cfg, model, given, checkpoint, tok) if cfg.task is not None else None
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    inputs = collect_inputs(model, train_rows, layers, cfg) if train_rows else {}
    timings["statistics_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    dense_eval = evaluate(model, eval_rows, cfg, tok) if eval_rows else None
    dense_task = evaluate_task(model, task, cfg.batch_size) if task is not None else None
    timings["dense_eval_s"] = round(time.perf_counter() - t0, 2)

    moe_config = moe_output_config(cfg, config, layout, fill_skipped=bool(inputs))
    per_layer: dict[str, dict[str, Any]] = {}
    moes, targets = {}, {}
    t0 = time.perf_counter()
    for stack, index, ffn in model.ffn_modules():
        name = f"{stack}.{index}"
        if name not in layers:
            continue
        tl = time.perf_counter()
        layer_inputs = inputs.get(name)
        sample = neuron_sample(ffn, layer_inputs) if layer_inputs is not None else None
        perm = split_layer(ffn, sample, experts, size, cfg.split, cfg.seed)
        moe = moes[name] = moe_from_dense(ffn, moe_config, perm)
        if moe_config.moe.fill_skipped:
            moe.set_fill(typical_activations(sample, moe))
        del sample
        layer_targets = init_router(moe, cfg.router, layer_inputs)
        if layer_targets is not None:
            targets[name] = layer_targets
        per_layer[name] = {}
        model.replace_ffn(stack, index, moe)
        log.info("moefy %s: %d experts of %d neurons, top-%d, split in %.1f s", name, experts, size, top_k, time.perf_counter() - tl)
    timings["split_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    for name, stats in train_routers(moes, inputs, targets, cfg).items():
        per_layer[name].update(stats)
    timings["routers_s"] = round(time.perf_counter() - t0, 2)
    model.config = moe_config
    calibration = None
    if cfg.calibrate:
        t0 = time.perf_counter()
        teacher, teacher_ckpt = load_model(checkpoint, dtype=torch.float32)
        try:
            with tempfile.TemporaryDirectory(prefix="moefy-calibrate-") as work:
                calibration = calibrate(model, teacher, train_rows, cfg, Path(work) / "run")
        finally:
            teacher_ckpt.close()
        timings["calibrate_s"] = round(time.perf_counter() - t0, 2)

    report: dict[str, Any] = {
        "experts": experts, "expert_size": size, "top_k": top_k, "ratio": ratio, "split": cfg.split, "router": cfg.router,
        "train_documents": len(train_rows), "eval_documents": len(eval_rows), "layers": per_layer,
        "calibrated": calibration is not None,
    }
    if calibration is not None:
        report["calibration"] = calibration
    set_kernels(model, kernels)
    t0 = time.perf_counter()
    if eval_rows:
        moes = {f"{s}.{i}": f for s, i, f in model.ffn_modules() if f"{s}.{i}" in layers}
        meter = RecallMeter(moes, config.d_ff)
        try:
            moe_eval = evaluate(model, eval_rows, cfg, tok, meter)
        finally:
            meter.close()
        for name, values in meter.results().items():
            per_layer[name].update(values)
        report["quality"] = quality(dense_eval, moe_eval)
    else:
        for name in per_layer:
            per_layer[name].update(experts=experts, top_k=top_k, compute_fraction=round(top_k * size / config.d_ff, 4))
    if task is not None:
        report["task"] = task_quality(task, dense_task, evaluate_task(model, task, cfg.batch_size))
    timings["moe_eval_s"] = round(time.perf_counter() - t0, 2)
    timings["total_s"] = round(time.perf_counter() - started, 2)
    report["timings"] = timings

    if stored_dtype is not None and stored_dtype != torch.float32:
        model.to(stored_dtype)
    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items() if k not in ("out", "force")}
    write_output(model, cfg, checkpoint, stage="moefy", options=options, metrics=report, report=report)
    ckpt.close()
    return report


def _dominant(summary: dict[str, int]):
    import torch

    if not summary:
        return None
    name = max(summary, key=summary.get)
    return getattr(torch, name, None)


def write_output(model, cfg: MoefyConfig, checkpoint: Path, *, stage: str, options: dict[str, Any],
                 metrics: dict[str, Any] | None, report: dict[str, Any] | None = None) -> dict[str, Any]:
    """OUT in one atomic step: the checkpoint, report.json, and the task head a task model
    carries (distill's task.json + head.safetensors, copied as they are: the head reads the
    final hidden states, which MoEfication approximates and restore gives back exactly)."""
    import shutil

    from cpmctl.checkpoint import save_checkpoint_with
    from cpmctl.stages.distill import HEAD_FILE, TASK_FILE

    def write_extra(tmp: Path) -> None:
        for name in (TASK_FILE, HEAD_FILE):
            if (checkpoint / name).is_file():
                shutil.copyfile(checkpoint / name, tmp / name)
        if report is not None:
            (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    tokenizer_dir = checkpoint / "tokenizer"
    return save_checkpoint_with(cfg.out, write_extra, model.config, model.state_dict(), overwrite=cfg.overwrite,
                                tokenizer_dir=tokenizer_dir if tokenizer_dir.is_dir() else None, stage=stage,
                                parents=[checkpoint], options=options, metrics=metrics)


def restore(cfg: MoefyConfig) -> dict[str, Any]:
    """The dense checkpoint back from a MoEfied one: neurons un-permuted, routers dropped."""
    from cpmctl.checkpoint import load_model, read_config
    from cpmctl.moe import MoEFeedForward, dense_from_moe

    checkpoint = resolve_checkpoint(Path(cfg.checkpoint))
    config = read_config(checkpoint)
    _check_restore(cfg, checkpoint, config)
    model, ckpt = load_model(checkpoint)
    restored = 0
    for stack, index, ffn in model.ffn_modules():
        if isinstance(ffn, MoEFeedForward):
            model.replace_ffn(stack, index, dense_from_moe(ffn, config))
            restored += 1
    model.config = config.replace(moe=None)
    provenance = write_output(model, cfg, checkpoint, stage="moefy-restore", options={"restore": True}, metrics=None)
    ckpt.close()
    return {"restored_layers": restored, "content_hash": provenance["content_hash"]}


def render(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if "restored_layers" in report:
        console.print(f"restored {report['restored_layers']} FFN layer(s); content hash {report['content_hash']}")
        return
    table = Table(title=f"moefy: {report['experts']} experts x {report['expert_size']} neurons, top-{report['top_k']}, "
                        f"split {report['split']}, router {report['router']}")
    for column in ("layer", "recall", "compute fraction", "router loss (first -> last)"):
        table.add_column(column)
    for name, values in report["layers"].items():
        loss = f"{values['router_loss_first']} -> {values['router_loss_last']}" if "router_loss_first" in values else "-"
        table.add_row(name, str(values.get("recall", "-")), str(values.get("compute_fraction", "-")), loss)
    console.print(table)
    q = report.get("quality")
    if q:
        if q["metric"] == "embedding cosine":
            console.print(f"held-out embeddings, dense vs MoE: mean cosine {q['mean_cosine']}, min {q['min_cosine']}")
        else:
            console.print(f"held-out perplexity: dense {q['dense_perplexity']}, MoE {q['moe_perplexity']} ({100 * q['perplexity_increase']:+.2f}%)")
    t = report.get("task")
    if t:
        console.print(f"task {t['file']} ({t['examples']} examples, {t['classes']} classes, {t['scoring']} scoring): accuracy "
                      f"dense {t['dense_accuracy']:.4f}, MoE {t['moe_accuracy']:.4f}; macro-F1 dense {t['dense_macro_f1']:.4f}, "
                      f"MoE {t['moe_macro_f1']:.4f}; same prediction on {t['agreement']:.1%}", soft_wrap=True)
    console.print(f"[dim]{report['timings']}[/dim]")
