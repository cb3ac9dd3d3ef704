"""Align an audio LM with preference pairs (DPO family): `accelerate launch recipes/align.py [--flag value ...]`.

With no flags it aligns the default finetune output (outputs/finetune) on the embedded synthetic pairs, where the
chosen continuation is clean and the rejected one a degraded (noisy, detuned or clipped) copy. From a notebook:
`from hf_audio_trainer import align`.
"""

from pathlib import Path

from accelerate import PartialState

from hf_audio_trainer.recipes import align_cli

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "align.yaml"

if __name__ == "__main__":
    result = align_cli(default_yaml=str(DEFAULT_CONFIG))
    if PartialState().is_main_process:  # one line, not one per process
        print(f"done: {result.global_step} steps, model in {result.output_dir}, metrics {result.metrics}")
