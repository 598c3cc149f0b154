"""`make gpu-check` / `python -m cpmctl.gpu_check`: every GPU figure cpmctl promises, from one
prepared run of under 8 minutes on one NVIDIA GPU, rehearsed on CPU in CI (`--rehearse`).

Sections (one module each, each run in its own subprocess under a hard time limit, so one that
fails or hangs is reported and the others still run):

    environment  device, versions, measured copy bandwidths (device and host-to-device) and bf16
                 matmul rate: the ceilings the other sections' figures are read against
    tests        `pytest -m "gpu or kernels"`: kernel tests and every CUDA code path's tests
    kernels      Triton MoE FFN vs dense cuBLAS and a grouped-GEMM reference, CPM-2 and Mixtral
                 FFN shapes, bf16, CUDA graphs at small batch
    model        a ~1B Llama-shaped model: forward and greedy decode vs transformers, bf16
    offload      a ~8 GB random MoE, experts in pinned host memory, 25% budget: vs resident,
                 accelerate and the host-to-device transfer bound
    decode       compiled greedy decode (static KV cache, CUDA graphs) vs eager, bf16, batch 1, as
                 a fraction of the memory-bandwidth bound
    hybrid       one expert computed on the device after a copy vs on the host where it lives, 1-128
                 rows, against the cost model's choice; decode with --expert-compute device/host/auto

Only the stdlib, torch, triton, transformers, accelerate and numpy are imported (the rehearsal
checks it), and nothing is downloaded or installed. Results: gpu-check/results.json and
gpu-check/results.md (the latter is what BENCHMARKS.md's "GPU check" section pastes in).
"""

# GPU seconds per section: a hard limit (the subprocess is killed at it) inside which each section
# skips the cases that would overrun. Their sum stays under 8 minutes with start-up included.
GPU_BUDGETS = {"environment": 25, "tests": 90, "kernels": 100, "model": 75, "decode": 70, "offload": 90, "hybrid": 30}
# CPU rehearsal at tiny shapes: every section runs its code paths on few cases (a CI test passes
# a smaller tests budget: that section then stops early and reports the tests it did not run).
REHEARSAL_BUDGETS = {"environment": 60, "tests": 180, "kernels": 120, "model": 90, "decode": 120, "offload": 120,
                     "hybrid": 60}
SECTIONS = tuple(GPU_BUDGETS)

# What the GPU image is known to hold (the list); anything a section imports must belong
# to one of these distributions, to what they require, to the stdlib or to this repository.
ALLOWED_DISTRIBUTIONS = ("torch", "triton", "transformers", "accelerate", "peft", "safetensors", "tokenizers",
                         "sentencepiece", "numpy", "typer", "rich", "pytest")
