"""Runs recipes/pretrain.py as a user would, but with the disk "full" for one checkpoint.

Usage: python tests/e2e/fill_disk_at_checkpoint.py STEP [recipe flags ...]. When checkpoint STEP is written, every
file of this process may grow only to the size of the previous checkpoint's model file (RLIMIT_FSIZE): the model's
weights still fit, the optimizer state (twice as large) does not, and the kernel refuses the write (EFBIG) the way a
full disk refuses it (ENOSPC). Only this test helper sets the limit; the library knows nothing of it.
"""

import resource
import signal
import sys
from pathlib import Path

from accelerate import Accelerator

from hf_audio_trainer.cli import run_recipe
from hf_audio_trainer.config import PretrainConfig
from hf_audio_trainer.stages import pretrain

ROOT = Path(__file__).resolve().parents[2]
full_at = f".tmp-checkpoint-{sys.argv.pop(1)}"
save_state = Accelerator.save_state


def save_state_on_a_full_disk(self, output_dir=None, **kwargs):
    if not str(output_dir).endswith(full_at):
        return save_state(self, output_dir, **kwargs)
    previous = sorted(Path(output_dir).parent.glob("checkpoint-*/model.safetensors"))[-1]
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a refused write, not a killed process
    resource.setrlimit(resource.RLIMIT_FSIZE, (previous.stat().st_size + 4096, hard))
    try:
        return save_state(self, output_dir, **kwargs)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


Accelerator.save_state = save_state_on_a_full_disk
run_recipe(pretrain, PretrainConfig, ROOT / "recipes" / "configs" / "pretrain.yaml")
