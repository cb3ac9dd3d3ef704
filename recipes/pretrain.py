"""Pretrain an audio language model: `accelerate launch recipes/pretrain.py [--config X.yaml] [--flag value ...]`.

With no flags it trains a tiny MusicGen-style model on the embedded synthetic music dataset (no downloads).
The same run from a notebook: `from hf_audio_trainer import pretrain; pretrain({"max_steps": 100})`.
"""

from pathlib import Path

from accelerate import PartialState

from hf_audio_trainer.recipes import pretrain_cli

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "pretrain.yaml"

if __name__ == "__main__":
    result = pretrain_cli(default_yaml=str(DEFAULT_CONFIG))
    if PartialState().is_main_process:  # one line, not one per process
        print(f"done: {result.global_step} steps, model in {result.output_dir}, metrics {result.metrics}")
