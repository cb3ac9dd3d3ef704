"""Fine-tune a pretrained audio LM: `accelerate launch recipes/finetune.py [--config X.yaml] [--flag value ...]`.

With no flags it continues the default pretrain run (outputs/pretrain) on the clean clips of the embedded synthetic
dataset. LoRA: `--use_peft true --lora_r 16`. From a notebook: `from hf_audio_trainer import finetune`.
"""

from pathlib import Path

from hf_audio_trainer.cli import run_recipe
from hf_audio_trainer.config import FinetuneConfig
from hf_audio_trainer.stages import finetune

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "finetune.yaml"

if __name__ == "__main__":
    run_recipe(finetune, FinetuneConfig, DEFAULT_CONFIG, made="model")
