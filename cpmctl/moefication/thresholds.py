"""Training-free activation sparsity (TEAL, Liu et al. 2024): per-layer magnitude thresholds.

For each FFN, two thresholds are read off sampled activations so that a target fraction of
entries falls below them: `threshold_in` on the FFN's input (what the up and gate projections
read) and `threshold_hidden` on its hidden activations (what the down projection reads), the
latter measured with the input already thresholded, as the layer will run. TEAL allocates
sparsity across layers greedily by the model's output error; here every layer gets the same
target (TEAL's uniform baseline), which keeps calibration to one pass over the sample.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cpmctl.errors import UserError
from cpmctl.ffn import FeedForward, ThresholdFeedForward, below_threshold_zeroed

# Entries of a sample whose quantile is taken: enough for a stable threshold, bounded memory.
QUANTILE_ENTRIES = 4_000_000


def check_sparsity(sparsity: float) -> None:
    if not 0 < sparsity < 1:
        raise UserError(f"a threshold sparsity must be in (0, 1), got {sparsity}", option="sparsity")


def magnitude_quantile(values: Tensor, q: float) -> float:
    """The q-quantile of |values| (on at most QUANTILE_ENTRIES entries, evenly strided)."""
    flat = values.detach().reshape(-1).abs().float()
    if flat.numel() > QUANTILE_ENTRIES:
        flat = flat[:: -(-flat.numel() // QUANTILE_ENTRIES)]
    k = max(1, min(flat.numel(), int(round(q * flat.numel()))))
    return float(flat.kthvalue(k).values)


@torch.no_grad()
def threshold_ffn_from_dense(ffn, config, inputs: Tensor, sparsity: float | None) -> ThresholdFeedForward:
    """A ThresholdFeedForward with `ffn`'s weights and thresholds calibrated on `inputs` [N, d]
    (the FFN's sampled inputs) so that `sparsity` of the input and of the hidden entries are
    skipped. `sparsity` None: thresholds of 0 (only exact zeros are skipped: the dense FFN)."""
    sparse = ThresholdFeedForward(config).to(ffn.w_in.weight.dtype)
    missing, unexpected = sparse.load_state_dict(ffn.state_dict(), strict=False)
    if unexpected or set(missing) != {"threshold_in", "threshold_hidden"}:
        raise ValueError(f"the FFN's parameters do not match a dense FFN: missing {missing}, unexpected {unexpected}")
    if sparsity is None:
        return sparse
    check_sparsity(sparsity)
    x = inputs.to(ffn.w_in.weight.dtype)
    sparse.threshold_in.fill_(magnitude_quantile(x, sparsity))
    hidden = hidden_before_threshold(sparse, below_threshold_zeroed(x, sparse.threshold_in))
    sparse.threshold_hidden.fill_(magnitude_quantile(hidden, sparsity))
    return sparse


@torch.no_grad()
def dense_from_threshold(ffn: ThresholdFeedForward, config) -> FeedForward:
    """The dense FFN back from a thresholded one: the same weights, the thresholds dropped (exact)."""
    dense = FeedForward(config.replace(threshold_sparsity=None)).to(ffn.w_in.weight.dtype)
    state = {k: v for k, v in ffn.state_dict().items() if k not in ("threshold_in", "threshold_hidden")}
    dense.load_state_dict(state)
    return dense


def hidden_before_threshold(ffn: ThresholdFeedForward, x: Tensor, chunk: int = 4096) -> Tensor:
    """The hidden activations of `ffn` on inputs x [N, d] (already thresholded by the caller),
    before its hidden threshold: in chunks, bounded memory."""
    return torch.cat([ffn.unthresholded_hidden(x[i : i + chunk]) for i in range(0, x.shape[0], chunk)])


class SkipMeter:
    """Forward pre-hooks on thresholded FFNs: the fraction of input and of hidden entries each
    skips over the real tokens (what the thresholds give on held-out text)."""

    def __init__(self, ffns: dict[str, ThresholdFeedForward]) -> None:
        self.ffns = ffns
        self.counts = {name: [0, 0, 0, 0] for name in ffns}  # skipped in, total in, skipped hidden, total hidden
        self.keep: dict[str, Tensor] = {}
        self.handles = [f.register_forward_pre_hook(self._hook(name)) for name, f in ffns.items()]

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1])
            keep = self.keep.get(name.split(".")[0])
            if keep is not None and keep.numel() == x.shape[0]:
                x = x[keep.reshape(-1)]
            with torch.no_grad():
                masked = below_threshold_zeroed(x, module.threshold_in)
                hidden = hidden_before_threshold(module, masked)
            c = self.counts[name]
            c[0] += int((x.abs() <= module.threshold_in).sum())
            c[1] += x.numel()
            c[2] += int((hidden.abs() <= module.threshold_hidden).sum())
            c[3] += hidden.numel()

        return hook

    def results(self) -> dict[str, dict[str, float]]:
        return {name: {"input_skipped": round(c[0] / max(1, c[1]), 4), "hidden_skipped": round(c[2] / max(1, c[3]), 4),
                       "threshold_in": round(float(self.ffns[name].threshold_in), 6),
                       "threshold_hidden": round(float(self.ffns[name].threshold_hidden), 6)}
                for name, c in self.counts.items()}

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
