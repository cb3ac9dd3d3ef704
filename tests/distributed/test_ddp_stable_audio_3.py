"""The stable_audio_3 family on two real CPU processes: fine-tuning a tiny Stable-Audio-3-shaped pipeline (with EMA and
condition dropout) under DDP, DeepSpeed ZeRO-3 and FSDP2, and a LoRA fine-tune under DDP, end where one process with
the same global batch does. Noise, times, windows and dropout are drawn per example from (seed, epoch, row), and
every window is padded to the same width, so the runs are the same computation."""

import pytest

from hf_audio_trainer import finetune
from hf_audio_trainer.config import FinetuneConfig, parse_config
from tests.distributed.test_ddp_flow import STRATEGIES, check_ran, run_two, strategy_param
from tests.helpers import ROOT, as_flags, max_abs_diff, stable_audio_3_quick_run, tiny_stable_audio_3, weights

# the whole file is in the second CI pass (`-m long`): the default pass stays under its time, and stable_audio's DDP
# tests cover the same latent-family machinery there
pytestmark = [pytest.mark.slow, pytest.mark.long, pytest.mark.distributed, pytest.mark.usefixtures("one_torch_thread")]

PORT_OFFSET = 24  # beside the flow and stable_audio families' ports
TOLERANCE = 5e-3  # of the largest weight change: Adam turns reduction-order noise in near-zero gradients into steps


def settings(source, output_dir, **overrides) -> dict:
    return stable_audio_3_quick_run(
        source, output_dir, synthetic_num_clips=20, max_steps=3, save_steps=3, condition_dropout=0.3, ema=True,
        ema_decay=0.5, learning_rate=1e-2, **overrides,
    )  # fmt: skip


@pytest.fixture(scope="module")
def single(tmp_path_factory, one_torch_thread):
    """The one-process references (per-device batch 4 = 2 processes x 2), read as recipes/finetune.py reads flags."""
    root = tmp_path_factory.mktemp("stable-audio-3-ddp")
    source = tiny_stable_audio_3(root / "source")
    recipe = str(ROOT / "recipes" / "configs" / "finetune.yaml")
    for name, extra in (("single", {}), ("single-lora", {"use_peft": True})):
        flags = as_flags(settings(source, root / name, per_device_train_batch_size=4, **extra))
        finetune(parse_config(flags, FinetuneConfig, recipe))
    return root, source


@pytest.mark.parametrize("strategy", [strategy_param(s) for s in ("ddp", "zero3", "fsdp2")])
def test_two_processes_fine_tune_like_one(single, strategy, monkeypatch):
    root, source = single
    out = root / strategy
    config, env, kind, port = STRATEGIES[strategy]  # FSDP2 wraps Stable Audio 3's DiT blocks
    config = ["StableAudio3DiTBlock" if c == "StableAudioDiTBlock" else c for c in config]
    monkeypatch.setitem(STRATEGIES, strategy, (config, env, kind, port))
    run_two(strategy, "recipes/finetune.py", settings(source, out, per_device_train_batch_size=2), PORT_OFFSET)
    check_ran(out, strategy)
    moved = max_abs_diff(weights(root / "single"), weights(source))
    assert moved > 1e-3  # it trained
    # the same computation up to float summation order: well under a percent of how far training moved a weight
    assert max_abs_diff(weights(out), weights(root / "single")) < TOLERANCE * moved
    assert max_abs_diff(weights(out / "ema"), weights(root / "single" / "ema")) < TOLERANCE * moved


def test_two_processes_lora_fine_tune_like_one(single):
    root, source = single
    out = root / "ddp-lora"
    lora = {"use_peft": True}
    run_two("ddp", "recipes/finetune.py", settings(source, out, per_device_train_batch_size=2, **lora), PORT_OFFSET + 1)
    check_ran(out, "ddp")
    moved = max_abs_diff(weights(root / "single-lora"), weights(source))
    assert max_abs_diff(weights(out), weights(root / "single-lora")) < TOLERANCE * moved
    assert (out / "transformer_lora" / "adapter_model.safetensors").is_file()
