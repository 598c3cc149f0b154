"""`cpmctl` with accelerate's FSDP on CPU processes: a test-only entry point for the FSDP tests.

    accelerate launch --config_file recipes/accelerate-fsdp.yaml tests/fsdp_on_cpu.py pretrain RECIPE OUT

accelerate applies FSDP on accelerators only: given an FSDP config on the CPU it quietly runs
DDP (its multi-CPU state ignores the FSDP plugin). Before cpmctl starts, this promotes that
multi-CPU state to FSDP with the plugin accelerate built from the config; everything after it is
what a GPU run executes: accelerate's FSDP2 preparation, torch's fully_shard (which supports CPU
tensors and gloo), the sharded forward/backward, and cpmctl's gathers and scatters of training
states. Only the device differs.
"""

from __future__ import annotations

import sys

import accelerate.state as accelerate_state
from accelerate.utils import DistributedType

_accelerator_state_init = accelerate_state.AcceleratorState.__init__


def _fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _accelerator_state_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
        # Later AcceleratorState() calls copy the process state in again: it must say FSDP too.
        accelerate_state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP


accelerate_state.AcceleratorState.__init__ = _fsdp_on_cpu

if __name__ == "__main__":
    from cpmctl.cli import main

    sys.exit(main())
