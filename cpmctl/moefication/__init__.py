"""MoEfication (Zhang et al. 2022): dense FFNs into equal experts with routers, as a library.

One job per module:
- `split`: balanced k-means / co-activation / random partitions of an FFN's neurons, and the
  permutation that makes each expert's neurons a contiguous block;
- `statistics`: bounded-memory reservoirs of FFN inputs collected in one pass over documents;
- `routers`: router initialisation from expert centres, MLP routers trained on activation mass,
  router recall;
- `calibration`: the experts' down projections fine-tuned with the routers active;
- `evaluation`: recall and executed compute per layer, held-out quality, task accuracy;
- `batches`: model inputs for batches of documents;
- `thresholds`: training-free activation sparsity (TEAL): per-layer magnitude thresholds.

The names below are the package's public API (`from cpmctl import moefication as mf`).
"""

from cpmctl.moefication.batches import RowBatches, encode_documents, length_sorted, lm_targets, model_inputs, real_tokens
from cpmctl.moefication.calibration import PerRatioCalibration, calibrate, mean_pooled
from cpmctl.moefication.evaluation import (RecallMeter, TaskSet, evaluate, evaluate_task, load_task_set, quality,
                                          quality_at_ratios, task_quality)
from cpmctl.moefication.routers import (ROUTERS, expert_centres, expert_mass, init_router, recall, router_targets,
                                        top_k_for, train_mlp_router, train_mlp_routers, train_routers)
from cpmctl.moefication.split import (SPLITS, NeuronSample, activation_profiles, balanced_assign, balanced_kmeans,
                                      choose_layers, coactivation_partition, expert_layout, ffn_names, neuron_sample,
                                      perm_from_labels, random_partition, split_layer, typical_activations)
from cpmctl.moefication.statistics import FFNInputRecorder, Reservoir, collect_inputs
from cpmctl.moefication.thresholds import (SkipMeter, check_sparsity, dense_from_threshold, magnitude_quantile,
                                          threshold_ffn_from_dense)

__all__ = [
    "FFNInputRecorder", "NeuronSample", "SkipMeter", "check_sparsity", "dense_from_threshold", "magnitude_quantile",
    "threshold_ffn_from_dense", "PerRatioCalibration", "ROUTERS", "RecallMeter", "Reservoir", "RowBatches", "SPLITS", "TaskSet",
    "activation_profiles", "balanced_assign", "balanced_kmeans", "calibrate", "choose_layers", "coactivation_partition",
    "collect_inputs", "expert_layout", "ffn_names", "load_task_set",
    "encode_documents", "evaluate", "evaluate_task", "expert_centres", "expert_mass", "init_router", "length_sorted", "lm_targets",
    "mean_pooled", "model_inputs", "neuron_sample", "perm_from_labels", "quality", "quality_at_ratios", "random_partition", "real_tokens",
    "recall", "router_targets", "split_layer", "task_quality", "top_k_for", "train_mlp_router", "train_mlp_routers",
    "train_routers", "typical_activations",
]
