"""TEST ONLY: finetune's CLI with Accelerate forced into FSDP on the CPU.

Accelerate 1.15 drops the FSDP plugin whenever the device is a CPU and wraps the model in DDP instead, so FSDP
code paths (sharded parameters, sharded checkpoints, full-state export) could never be tested without a GPU.
This entry swaps in an `Accelerator` that sets the shared state to FSDP, with the plugin read from the
launcher's FSDP_* environment, right after construction. It touches private state and is never on a user's
path; `tests/test_fsdp.py` checks that it really shards (DTensor parameters, .distcp checkpoint files).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import accelerate  # noqa: E402
import torch  # noqa: E402
from accelerate.state import PartialState  # noqa: E402
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin  # noqa: E402


class CPUFSDPAccelerator(accelerate.Accelerator):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        plugin = FullyShardedDataParallelPlugin()  # reads FSDP_* variables set by `accelerate launch`
        if self.state.mixed_precision != "no":
            plugin.set_mixed_precision(self.state.mixed_precision)
        # both shared states: every AcceleratorState() refreshes itself from PartialState's
        for state in (PartialState(), self.state):
            state.distributed_type = DistributedType.FSDP
            state.device = torch.device("cpu")  # FSDP1 rejects "cpu:0"
        self.state.fsdp_plugin = plugin


accelerate.Accelerator = CPUFSDPAccelerator

from finetune.cli import main  # noqa: E402

sys.exit(main())
