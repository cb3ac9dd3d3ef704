"""Pretrain an audio language model: `accelerate launch recipes/pretrain.py [--config X.yaml] [--flag value ...]`.

With no flags it trains a tiny MusicGen-style model on the embedded synthetic music dataset (no downloads).
The same run from a notebook: `from hf_audio_trainer import pretrain; pretrain({"max_steps": 100})`.
"""

from pathlib import Path

from hf_audio_trainer.cli import run_recipe
from hf_audio_trainer.config import PretrainConfig
from hf_audio_trainer.stages import pretrain

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "pretrain.yaml"

if __name__ == "__main__":
    run_recipe(pretrain, PretrainConfig, DEFAULT_CONFIG, made="model")
