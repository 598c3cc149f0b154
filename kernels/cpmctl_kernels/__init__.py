"""cpmctl's Triton kernels for sparse FFN and expert routing.

The package lives in the top-level kernels/ folder and imports as `cpmctl_kernels` (the bare
name `kernels` belongs to a PyPI package).
"""
