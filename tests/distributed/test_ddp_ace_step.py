"""The ace_step family on two real CPU processes under DDP: a full fine-tune (the DiT and the condition encoder) and a
LoRA fine-tune of a tiny AceStepPipeline, with condition dropout, end where one process with the same global batch
does. Noise, times and dropout are drawn per example from (seed, epoch, row), not per rank, so the runs are the same
computation."""

import json

import pytest
from safetensors.torch import load_file

from hf_audio_trainer import finetune
from hf_audio_trainer.config import FinetuneConfig, parse_config
from tests.distributed.test_ddp_flow import STRATEGIES, needs_deepspeed, run_two
from tests.e2e.test_ace_step import max_abs_diff, weights
from tests.helpers import ROOT, as_flags
from tests.tiny_ace_step import ace_step_quick_run, tiny_ace_step

# the whole file is in the second CI pass (`-m long`): the default pass stays under its time, and stable_audio's DDP
# tests cover the same latent-family machinery there
pytestmark = [pytest.mark.slow, pytest.mark.long, pytest.mark.distributed, pytest.mark.usefixtures("one_torch_thread")]

PORT_OFFSET = 30  # beside the flow (0, 1) and stable_audio (10, 11) families' ports
KINDS = {"full": {"use_peft": False, "train_condition_encoder": True}, "lora": {"use_peft": True, "lora_dropout": 0.0}}


def settings(source, output_dir, **overrides) -> dict:
    return ace_step_quick_run(
        source, output_dir, synthetic_num_clips=20, max_steps=3, save_steps=3, condition_dropout=0.3,
        learning_rate=1e-2, gradient_accumulation_steps=1, **overrides,
    )  # fmt: skip


@pytest.fixture(scope="module")
def single(tmp_path_factory, one_torch_thread):
    """The one-process references (per-device batch 4 = 2 processes x 2), read as recipes/finetune.py reads flags."""
    root = tmp_path_factory.mktemp("ace-step-ddp")
    source = tiny_ace_step(root / "source")
    recipe = str(ROOT / "recipes" / "configs" / "finetune.yaml")
    for kind, extra in KINDS.items():
        flags = as_flags(settings(source, root / f"single-{kind}", per_device_train_batch_size=4, **extra))
        finetune(parse_config(flags, FinetuneConfig, recipe))
    return root, source


@pytest.mark.parametrize("kind", list(KINDS))
def test_two_processes_fine_tune_like_one(single, kind):
    root, source = single
    out = root / f"ddp-{kind}"
    port = PORT_OFFSET + list(KINDS).index(kind)
    run_two("ddp", "recipes/finetune.py", settings(source, out, per_device_train_batch_size=2, **KINDS[kind]), port)
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["num_processes"] == 2 and state["distributed_type"] == f"DistributedType.{STRATEGIES['ddp'][2]}"
    names = load_file(str(out / "checkpoint-3" / "model.safetensors")).keys()  # what trains, unwrapped
    assert state["weights"] == "trained" and names and not [n for n in names if n.startswith("module.")]
    assert not (out / "checkpoint-3" / "text_encoder").exists() and (out / "frozen" / "text_encoder").is_dir()
    assert max_abs_diff(weights(out), weights(root / f"single-{kind}")) < 2e-5
    assert max_abs_diff(weights(root / f"single-{kind}"), weights(source)) > 1e-3  # it trained
    if kind == "lora":
        assert (out / "transformer_lora" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.long
@needs_deepspeed
def test_two_processes_under_zero3_fine_tune_like_one(single):
    """ZeRO-3 partitions the DiT and the condition encoder (the null condition is read beside the encoder's forward;
    a parameter that small stays whole on every rank)."""
    root, source = single
    out = root / "zero3-full"
    run_two("zero3", "recipes/finetune.py", settings(source, out, per_device_train_batch_size=2, **KINDS["full"]),
            PORT_OFFSET)  # fmt: skip
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["num_processes"] == 2 and state["distributed_type"] == "DistributedType.DEEPSPEED"
    assert max_abs_diff(weights(out), weights(root / "single-full")) < 2e-5
