"""The flow family on two real CPU processes: pretrain (with EMA) under DDP, DeepSpeed ZeRO-3 and FSDP2, and a
Diffusion-DPO align under DDP, end where one process with the same global batch does. Noise, timesteps and condition
dropout are drawn per example from (seed, epoch, row), not per rank, so the runs are the same computation."""

import importlib.util
import json

import pytest
from safetensors.torch import load_file

from hf_audio_trainer import align, pretrain
from hf_audio_trainer.config import AlignConfig, PretrainConfig, parse_config
from tests.helpers import ROOT, as_flags, flow_quick_run, launch, max_abs_diff, weights

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.usefixtures("one_torch_thread")]

needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")
STRATEGIES = {  # accelerate arguments, environment, what the checkpoint records, port
    "ddp": (["--config_file", "accelerate_configs/cpu_ddp.yaml"], {"ACCELERATE_USE_CPU": "true"}, "MULTI_CPU", 29581),
    "zero3": (["--config_file", "accelerate_configs/deepspeed_zero3.yaml"], {}, "DEEPSPEED", 29583),
    # the DiT's blocks are the FSDP units (the shipped config names MusicGen's decoder layer)
    "fsdp2": (["--config_file", "accelerate_configs/fsdp2.yaml", "--fsdp_transformer_layer_cls_to_wrap",
               "StableAudioDiTBlock"], {}, "FSDP", 29585),
}  # fmt: skip


def settings(output_dir, **overrides) -> dict:
    return {**flow_quick_run(output_dir), "synthetic_num_clips": 40, "max_steps": 3, "save_steps": 3,
            "condition_dropout": 0.3, "ema": True, "ema_decay": 0.5, **overrides}  # fmt: skip


@pytest.fixture(scope="module")
def single(tmp_path_factory, one_torch_thread):
    root = tmp_path_factory.mktemp("flow-ddp")
    # the recipes' YAML files as `recipes/<stage>.py` reads them (a notebook's dict starts from the dataclass defaults)
    flags = as_flags(settings(root / "single", per_device_train_batch_size=4))
    pretrain(parse_config(flags, PretrainConfig, str(ROOT / "recipes" / "configs" / "pretrain_flow.yaml")))
    pairs = dict(model_name_or_path=str(root / "single"), synthetic_num_pairs=24, max_steps=3, save_steps=3,
                 learning_rate=1e-3, beta=2000.0)  # fmt: skip
    flags = as_flags(align_settings(root / "align-single", per_device_train_batch_size=4, **pairs))
    align(parse_config(flags, AlignConfig, str(ROOT / "recipes" / "configs" / "align.yaml")))
    return root, pairs


def align_settings(output_dir, **overrides) -> dict:
    return {"model_family": "flow", "output_dir": str(output_dir), "report_to": "none", "logging_steps": 1,
            "max_duration_seconds": 1.0, **overrides}  # fmt: skip


def run_two(strategy: str, recipe: str, flags: dict, port_offset: int = 0) -> None:
    config, env, _, port = STRATEGIES[strategy]
    script = ["tests/distributed/fsdp2_on_cpu.py"] if strategy == "fsdp2" else []
    args = [*config, "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(port + port_offset)]
    done = launch([*args, *script, recipe, *as_flags(flags)], env=env, timeout=400)
    if done.returncode != 0:  # the whole tail, untruncated (an assertion's repr would cut the middle out)
        pytest.fail(f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-8000:]}", pytrace=False)


def check_ran(folder, strategy: str) -> None:
    checkpoint = folder / "checkpoint-3"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["num_processes"] == 2 and state["distributed_type"] == f"DistributedType.{STRATEGIES[strategy][2]}"
    # the frozen T5 and VAE are stored once, in frozen/, under every strategy; under DDP the checkpoint's weights are
    # what trains, under the unwrapped model's names (FSDP2 and ZeRO-3 save their own shards, whole)
    assert not (checkpoint / "text_encoder").exists() and (folder / "frozen" / "text_encoder").is_dir()
    if strategy == "ddp":
        names = load_file(str(checkpoint / "model.safetensors")).keys()
        assert state["weights"] == "trained" and not [n for n in names if n.startswith("module.") or "time_proj" in n]
    else:
        assert "weights" not in state


def strategy_param(name: str):
    marks = [needs_deepspeed] if name == "zero3" else []
    if name != "ddp":
        marks.append(pytest.mark.long)  # the second CI pass
    return pytest.param(name, marks=marks, id=name)


@pytest.mark.parametrize("strategy", [strategy_param(s) for s in STRATEGIES])
def test_two_processes_pretrain_like_one(single, strategy):
    root, _ = single
    out = root / strategy
    run_two(strategy, "recipes/pretrain.py", settings(out, per_device_train_batch_size=2))
    check_ran(out, strategy)
    assert max_abs_diff(weights(out), weights(root / "single")) < 2e-5
    assert max_abs_diff(weights(out / "ema"), weights(root / "single" / "ema")) < 2e-5


def test_two_processes_align_like_one(single):
    root, pairs = single
    out = root / "align-ddp"
    run_two("ddp", "recipes/align.py", align_settings(out, per_device_train_batch_size=2, **pairs), port_offset=1)
    check_ran(out, "ddp")
    assert max_abs_diff(weights(out), weights(root / "align-single")) < 2e-5
    assert max_abs_diff(weights(root / "align-single"), weights(root / "single")) > 1e-5  # DPO moved the weights
