"""The text-conditioned family on two real CPU processes: a fine-tune of a Hub-layout MusicGen, and an align from it
on text-prompted pairs, under DDP and under DeepSpeed ZeRO-3 end where one process with the same global batch does
(condition dropout included: it is drawn per example from (seed, epoch, row), not per rank)."""

import importlib.util
import json

import pytest
from safetensors.torch import load_file

from hf_audio_trainer import align, finetune
from hf_audio_trainer.config import AlignConfig, FinetuneConfig, parse_config
from tests.e2e.test_musicgen_text import run_settings
from tests.helpers import ROOT, as_flags, described_folder, launch, max_abs_diff, tiny_codec, tiny_musicgen, weights

# one torch thread in this process too, as each launched rank has: EnCodec's codes are the nearest codebook entry,
# and a different thread count rounds the encoder's output differently, which can flip a near-tie
pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.usefixtures("one_torch_thread")]

STRATEGIES = {
    "ddp": (["--config_file", "accelerate_configs/cpu_ddp.yaml"], {"ACCELERATE_USE_CPU": "true"}, "MULTI_CPU", 29551),
    "zero3": (["--config_file", "accelerate_configs/deepspeed_zero3.yaml"], {}, "DEEPSPEED", 29553),
}


@pytest.fixture(scope="module")
def single(tmp_path_factory, one_torch_thread):
    root = tmp_path_factory.mktemp("text-ddp")
    model = tiny_musicgen(root / "musicgen", tiny_codec(root / "codec"))
    music = described_folder(root / "music", num_clips=16)
    common = dict(model_name_or_path=str(model), dataset_name=str(music), max_steps=3, save_steps=3,
                  learning_rate=2e-3, condition_dropout=0.3)  # fmt: skip
    # the recipe's YAML as `recipes/finetune.py` reads it (a notebook's dict starts from the dataclass defaults)
    flags = as_flags(run_settings(root / "single", per_device_train_batch_size=4, **common))
    finetune(parse_config(flags, FinetuneConfig, str(ROOT / "recipes" / "configs" / "finetune.yaml")))
    # align from that fine-tune, on the embedded text-prompted pairs
    pairs = dict(model_name_or_path=str(root / "single"), synthetic_num_pairs=24, max_steps=3, save_steps=3,
                 learning_rate=1e-3, max_duration_seconds=3.0)  # fmt: skip
    flags = as_flags(run_settings(root / "align-single", per_device_train_batch_size=4, **pairs))
    align(parse_config(flags, AlignConfig, str(ROOT / "recipes" / "configs" / "align.yaml")))
    return root, common, pairs


@pytest.mark.parametrize(
    "strategy",
    ["ddp", pytest.param("zero3", marks=[pytest.mark.long, pytest.mark.skipif(
        importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")])],
)  # fmt: skip
def test_two_processes_finetune_and_align_like_one(single, strategy):
    root, common, pairs = single
    config, env, distributed_type, port = STRATEGIES[strategy]
    settings = run_settings(root / strategy, per_device_train_batch_size=2, **common)
    args = [*config, "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(port)]
    done = launch([*args, "recipes/finetune.py", *as_flags(settings)], env=env, timeout=400)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])
    checkpoint = root / strategy / "checkpoint-3"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["num_processes"] == 2 and state["distributed_type"] == f"DistributedType.{distributed_type}"
    if strategy == "ddp":  # what trains, under the unwrapped names; the frozen T5 and EnCodec once, in frozen/
        names = load_file(str(checkpoint / "model.safetensors")).keys()
        assert state["weights"] == "trained" and names and all(n.startswith(("decoder.", "enc_to_dec")) for n in names)
        assert "text_encoder.shared.weight" in load_file(str(root / strategy / "frozen" / "frozen.safetensors"))
    else:  # ZeRO-3 saves its own shards, whole
        assert "weights" not in state
    assert max_abs_diff(weights(root / strategy), weights(root / "single")) < 2e-5
    assert max_abs_diff(weights(root / "single"), weights(root / "musicgen")) > 1e-4  # it really trained

    settings = run_settings(root / f"align-{strategy}", per_device_train_batch_size=2, **pairs)
    args[-1] = str(port + 1)
    done = launch([*args, "recipes/align.py", *as_flags(settings)], env=env, timeout=400)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])
    state = json.loads((root / f"align-{strategy}" / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["num_processes"] == 2 and state["distributed_type"] == f"DistributedType.{distributed_type}"
    assert max_abs_diff(weights(root / f"align-{strategy}"), weights(root / "align-single")) < 2e-5
    assert max_abs_diff(weights(root / "align-single"), weights(root / "single")) > 1e-5  # DPO moved the weights
