"""TEST-ONLY harness: run a recipe under FSDP2 on CPU processes (gloo), for tests of the FSDP2 code paths.

accelerate turns an FSDP config into plain DDP when it runs on CPU, without a word. This wrapper lets PartialState
come up as usual (gloo, two CPU processes), then relabels it so that AcceleratorState takes its FSDP branch, and
runs the recipe. Never use this for real training: on GPUs the shipped `accelerate_configs/fsdp2.yaml` needs nothing.

    accelerate launch --config_file accelerate_configs/fsdp2.yaml --num_processes 2 \
        tests/distributed/fsdp2_on_cpu.py recipes/pretrain.py --max_steps 4 ...
"""

import os
import runpy
import sys

from accelerate.state import PartialState
from accelerate.utils import DistributedType

os.environ["ACCELERATE_USE_CPU"] = "true"  # the launcher wrote "False" here from the FSDP config's use_cpu
state = PartialState(cpu=True)
if state.distributed_type != DistributedType.MULTI_CPU or state.num_processes < 2:
    raise SystemExit(f"expected >= 2 CPU processes, got {state.distributed_type} x {state.num_processes}")
state.distributed_type = DistributedType.MULTI_GPU  # AcceleratorState turns MULTI_GPU + ACCELERATE_USE_FSDP into FSDP
recipe, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_path(recipe, run_name="__main__")
