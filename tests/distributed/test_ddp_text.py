"""The text-conditioned family on two real CPU processes: a fine-tune of a Hub-layout MusicGen under DDP and under
DeepSpeed ZeRO-3 ends where one process with the same global batch does, condition dropout included (it is drawn
per example from (seed, epoch, row), not per rank)."""

import importlib.util
import json

import pytest

from hf_audio_trainer import finetune
from hf_audio_trainer.config import FinetuneConfig, parse_config
from tests.e2e.test_musicgen_text import run_settings
from tests.helpers import ROOT, as_flags, described_folder, launch, max_abs_diff, tiny_codec, tiny_musicgen, weights

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

STRATEGIES = {
    "ddp": (["--config_file", "accelerate_configs/cpu_ddp.yaml"], {"ACCELERATE_USE_CPU": "true"}, "MULTI_CPU", 29551),
    "zero3": (["--config_file", "accelerate_configs/deepspeed_zero3.yaml"], {}, "DEEPSPEED", 29553),
}


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    root = tmp_path_factory.mktemp("text-ddp")
    model = tiny_musicgen(root / "musicgen", tiny_codec(root / "codec"))
    music = described_folder(root / "music", num_clips=16)
    common = dict(model_name_or_path=str(model), dataset_name=str(music), max_steps=3, save_steps=3,
                  learning_rate=1e-2, condition_dropout=0.3)  # fmt: skip
    # the recipe's YAML as `recipes/finetune.py` reads it (a notebook's dict starts from the dataclass defaults)
    flags = as_flags(run_settings(root / "single", per_device_train_batch_size=4, **common))
    finetune(parse_config(flags, FinetuneConfig, str(ROOT / "recipes" / "configs" / "finetune.yaml")))
    return root, common


@pytest.mark.parametrize(
    "strategy",
    ["ddp", pytest.param("zero3", marks=pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                                           reason="deepspeed not installed"))],
)  # fmt: skip
def test_two_processes_finetune_like_one(single, strategy):
    root, common = single
    config, env, distributed_type, port = STRATEGIES[strategy]
    settings = run_settings(root / strategy, per_device_train_batch_size=2, **common)
    args = [*config, "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(port)]
    done = launch([*args, "recipes/finetune.py", *as_flags(settings)], env=env, timeout=400)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])
    state = json.loads((root / strategy / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["num_processes"] == 2 and state["distributed_type"] == f"DistributedType.{distributed_type}"
    assert max_abs_diff(weights(root / strategy), weights(root / "single")) < 2e-5
    assert max_abs_diff(weights(root / "single"), weights(root / "musicgen")) > 1e-4  # it really trained
