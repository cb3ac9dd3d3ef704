"""The training stages, each an importable function: pretrain, finetune, align and train_codec."""

from hf_audio_trainer.stages.align import align
from hf_audio_trainer.stages.codec import train_codec
from hf_audio_trainer.stages.common import RunResult
from hf_audio_trainer.stages.finetune import finetune
from hf_audio_trainer.stages.pretrain import pretrain

__all__ = ["RunResult", "align", "finetune", "pretrain", "train_codec"]
