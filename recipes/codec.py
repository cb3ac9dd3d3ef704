"""Train an audio codec with discriminators: `accelerate launch recipes/codec.py [--config X.yaml] [--flag value ...]`.

With no flags it trains a tiny EnCodec model (4 codebooks of 256, 50 frames/s at 16 kHz) against a multi-scale STFT
discriminator on the embedded synthetic music dataset. The output folder is an audio tokenizer:
`accelerate launch recipes/pretrain.py --tokenizer outputs/codec`. From a notebook:
`from hf_audio_trainer import train_codec; train_codec({"max_steps": 100})`.
"""

from pathlib import Path

from hf_audio_trainer.cli import run_recipe
from hf_audio_trainer.config import CodecConfig
from hf_audio_trainer.stages import train_codec

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "codec.yaml"

if __name__ == "__main__":
    run_recipe(train_codec, CodecConfig, DEFAULT_CONFIG, made="codec")
