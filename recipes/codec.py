"""Train an audio codec with discriminators: `accelerate launch recipes/codec.py [--config X.yaml] [--flag value ...]`.

With no flags it trains a tiny EnCodec model (4 codebooks of 256, 50 frames/s at 16 kHz) against a multi-scale STFT
discriminator on the embedded synthetic music dataset. The output folder is an audio tokenizer:
`accelerate launch recipes/pretrain.py --tokenizer outputs/codec`. From a notebook:
`from hf_audio_trainer import train_codec; train_codec({"max_steps": 100})`.
"""

from pathlib import Path

from accelerate import PartialState

from hf_audio_trainer.recipes import codec_cli

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "codec.yaml"

if __name__ == "__main__":
    result = codec_cli(default_yaml=str(DEFAULT_CONFIG))
    if PartialState().is_main_process:  # one line, not one per process
        print(f"done: {result.global_step} steps, codec in {result.output_dir}, metrics {result.metrics}")
