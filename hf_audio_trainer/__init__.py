"""hf-audio-trainer: training recipes for audio language models on the Hugging Face stack."""

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = [
    "AlignConfig",
    "CodecConfig",
    "FinetuneConfig",
    "PretrainConfig",
    "RunResult",
    "align",
    "finetune",
    "parse_config",
    "pretrain",
    "train_codec",
]
_CONFIGS = ("AlignConfig", "CodecConfig", "FinetuneConfig", "PretrainConfig", "parse_config")
_STAGES = ("RunResult", "align", "finetune", "pretrain", "train_codec")

if TYPE_CHECKING:
    from hf_audio_trainer.config import AlignConfig, CodecConfig, FinetuneConfig, PretrainConfig, parse_config
    from hf_audio_trainer.stages import RunResult, align, finetune, pretrain, train_codec


def __getattr__(name: str):
    # lazy, so `import hf_audio_trainer.data.synthetic` does not pay for accelerate and transformers
    if name in _CONFIGS:
        from hf_audio_trainer import config

        return getattr(config, name)
    if name in _STAGES:
        from hf_audio_trainer import stages

        return getattr(stages, name)
    raise AttributeError(f"module 'hf_audio_trainer' has no attribute {name!r}")
