"""Fine-tune a pretrained audio LM: `accelerate launch recipes/finetune.py [--config X.yaml] [--flag value ...]`.

With no flags it continues the default pretrain run (outputs/pretrain) on the clean clips of the embedded synthetic
dataset. LoRA: `--use_peft true --lora_r 16`. From a notebook: `from hf_audio_trainer import finetune`.
"""

from pathlib import Path

from accelerate import PartialState

from hf_audio_trainer.recipes import finetune_cli

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "finetune.yaml"

if __name__ == "__main__":
    result = finetune_cli(default_yaml=str(DEFAULT_CONFIG))
    if PartialState().is_main_process:  # one line, not one per process
        print(f"done: {result.global_step} steps, model in {result.output_dir}, metrics {result.metrics}")
