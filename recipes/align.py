"""Align an audio LM with preference pairs (DPO family): `accelerate launch recipes/align.py [--flag value ...]`.

With no flags it aligns the default finetune output (outputs/finetune) on the embedded synthetic pairs, where the
chosen continuation is clean and the rejected one a degraded (noisy, detuned or clipped) copy. From a notebook:
`from hf_audio_trainer import align`.
"""

from pathlib import Path

from hf_audio_trainer.cli import run_recipe
from hf_audio_trainer.config import AlignConfig
from hf_audio_trainer.stages import align

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "align.yaml"

if __name__ == "__main__":
    run_recipe(align, AlignConfig, DEFAULT_CONFIG, made="model")
