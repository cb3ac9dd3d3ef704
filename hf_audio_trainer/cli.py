"""What a recipe script does around its stage: parse the flags, run the stage, and end a user's mistake in one line.

A `UserError` (a bad flag or YAML file, missing data, a checkpoint that does not fit ...) prints
`<recipe>.py: error: <what and the fix>` and exits with status 2, as argparse does; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

from hf_audio_trainer.config import parse_config
from hf_audio_trainer.errors import UserError


def run_recipe(stage: Callable, config_cls: type, default_yaml: str | os.PathLike, made: str = "model") -> None:
    """`accelerate launch recipes/<stage>.py [--config X.yaml] [--flag value ...]`: flags override the YAML file
    (the recipe's `default_yaml`, or its `<stage>_<family>.yaml` variant for `--model_family`)."""
    prog = Path(sys.argv[0]).name
    try:
        cfg = parse_config(None, config_cls, str(default_yaml))
    except UserError as err:  # the same on every process: said once
        fail(prog, err, say=int(os.environ.get("RANK", "0")) == 0)
    try:
        result = stage(cfg)
    except UserError as err:  # may be seen by only some processes (their share of the data): each says it
        fail(prog, err, say=True)
    from accelerate import PartialState

    if PartialState().is_main_process:  # one line, not one per process
        print(f"done: {result.global_step} steps, {made} in {result.output_dir}, metrics {result.metrics}")


def fail(prog: str, err: UserError, say: bool = True) -> None:
    if say:
        print(f"{prog}: error: {' '.join(str(err).split())}", file=sys.stderr, flush=True)
    sys.exit(2)
