"""DeepSpeed ZeRO-2 / ZeRO-3 and FSDP2 with two real CPU processes: the shipped configs train, checkpoint (sharded
where the strategy shards, EMA too), resume exactly and export one plain `from_pretrained` model equal to a
single-process run, raw and EMA.

DeepSpeed runs on CPU with gloo (the recipe picks it when there is no GPU); its first run compiles a small
shared-memory op (about a minute, cached in ~/.cache/torch_extensions). FSDP2 goes through the test-only harness
`fsdp2_on_cpu.py`, because accelerate silently runs FSDP configs as DDP on CPU.
"""

import importlib.util
import json

import pytest
from transformers import MusicgenForCausalLM

from hf_audio_trainer import align, finetune, pretrain
from tests.helpers import as_flags, fit_small_tokenizer, launch, max_abs_diff, quick_run, weights

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")

# strategy: (launch arguments before the script, accelerate's distributed type, files each checkpoint must have)
STRATEGIES = {
    "zero2": (
        ["--config_file", "accelerate_configs/deepspeed_zero2.yaml"],
        "DistributedType.DEEPSPEED",
        [f"pytorch_model/zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)],  # optimizer states sharded
    ),
    "zero3": (
        ["--config_file", "accelerate_configs/deepspeed_zero3.yaml"],
        "DistributedType.DEEPSPEED",
        [f"pytorch_model/zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in (0, 1)]  # parameters sharded too
        + [f"ema-rank{r}-of-2.safetensors" for r in (0, 1)],  # each rank's average of its own shard
    ),
    "fsdp2": (
        ["--config_file", "accelerate_configs/fsdp2.yaml"],
        "DistributedType.FSDP",
        [f"pytorch_model_fsdp_0/__{r}_0.distcp" for r in (0, 1)] + [f"ema-rank{r}-of-2.safetensors" for r in (0, 1)],
    ),
}
PORTS = {"zero2": 29541, "zero3": 29543, "fsdp2": 29545}
COMMON = dict(max_steps=4, save_steps=2, eval_steps=2, ema=True, ema_decay=0.5)


def launch_strategy(strategy: str, settings: dict, port_offset: int = 0, recipe: str | None = None):
    config, _, _ = STRATEGIES[strategy]
    args = [*config, "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(PORTS[strategy])]
    args[-1] = str(PORTS[strategy] + port_offset)
    script = ["tests/distributed/fsdp2_on_cpu.py"] if strategy == "fsdp2" else []
    recipe = recipe or ("recipes/align.py" if "synthetic_num_pairs" in settings else "recipes/pretrain.py")
    done = launch([*args, *script, recipe, *as_flags(settings)], timeout=400)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])
    return done


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One tokenizer and the single-process reference run (per-device batch 4 = 2 processes x 2)."""
    root = tmp_path_factory.mktemp("sharded")
    tokenizer = fit_small_tokenizer(root / "tokenizer")
    single = quick_run(tokenizer, root / "single", per_device_train_batch_size=4, **COMMON)
    pretrain(single)
    return root, tokenizer


def strategy_param(name: str):
    marks = [needs_deepspeed] if name.startswith("zero") else []
    if name in ("zero3", "fsdp2"):  # the two longest: the second CI pass (`-m long`)
        marks.append(pytest.mark.long)
    return pytest.param(name, marks=marks, id=name)


@pytest.mark.parametrize("strategy", [strategy_param(s) for s in STRATEGIES])
def test_two_processes_train_checkpoint_resume_and_export_like_one(shared, strategy):
    root, tokenizer = shared
    _, distributed_type, shard_files = STRATEGIES[strategy]
    straight = quick_run(tokenizer, root / strategy, per_device_train_batch_size=2, **COMMON)
    launch_strategy(strategy, straight)

    checkpoint = root / strategy / "checkpoint-2"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["num_processes"] == 2 and state["distributed_type"] == distributed_type
    for name in shard_files:
        assert name in state["files"] and (checkpoint / name).is_file(), name

    # the export is one consolidated from_pretrained folder, raw and EMA, equal to the single-process run's
    single, this = root / "single", root / strategy
    assert max_abs_diff(weights(this), weights(single)) < 1e-5
    assert max_abs_diff(weights(this / "ema"), weights(single / "ema")) < 1e-5
    assert max_abs_diff(weights(single / "ema"), weights(single)) > 1e-4  # the EMA really differs from the raw weights
    MusicgenForCausalLM.from_pretrained(this / "ema")

    if strategy == "zero2":  # ZeRO-2 keeps whole parameters and one EMA; its resume path is DDP's (tested elsewhere)
        return
    # restart from the step-2 checkpoint (sharded model, optimizer, EMA shards, both ranks' RNG): same end point
    resumed = quick_run(
        tokenizer, root / f"{strategy}-resumed", per_device_train_batch_size=2, resume_from_checkpoint=str(checkpoint),
        **COMMON,
    )  # fmt: skip
    launch_strategy(strategy, resumed, port_offset=1)
    assert max_abs_diff(weights(root / f"{strategy}-resumed"), weights(this)) < 1e-6
    assert max_abs_diff(weights(root / f"{strategy}-resumed" / "ema"), weights(this / "ema")) < 1e-6


@needs_deepspeed
def test_align_under_zero3_equals_one_process(shared):
    """ZeRO-3 partitions the frozen reference as it loads: it gets an engine of its own and still scores like DDP."""
    root, _ = shared

    def settings(out, **overrides):
        run = quick_run(None, out, model_name_or_path=str(root / "single"), synthetic_num_pairs=24, max_steps=3,
                        save_steps=3, learning_rate=1e-3, **overrides)  # fmt: skip
        del run["tokenizer"], run["synthetic_num_clips"]
        return run

    launch_strategy("zero3", settings(root / "align-zero3", per_device_train_batch_size=2), port_offset=2)
    state = json.loads((root / "align-zero3" / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["num_processes"] == 2 and state["distributed_type"] == "DistributedType.DEEPSPEED"
    single = align(settings(root / "align-single", per_device_train_batch_size=4))
    assert max_abs_diff(weights(root / "align-zero3"), weights(root / "align-single")) < 2e-5
    assert single.metrics["train/rewards/margins"] != 0.0  # the reference really scored: margins moved off zero


def test_lora_finetune_under_fsdp2_exports_the_merged_model_of_one_process(shared):
    """FSDP2 forbids deepcopy: the merged LoRA export is rebuilt from the gathered state dict instead."""
    root, tokenizer = shared
    lora = dict(model_name_or_path=str(root / "single"), max_steps=3, save_steps=3, use_peft=True, lora_dropout=0.0)
    launch_strategy("fsdp2", quick_run(tokenizer, root / "lora-fsdp2", per_device_train_batch_size=2, **lora),
                    port_offset=2, recipe="recipes/finetune.py")  # fmt: skip
    state = json.loads((root / "lora-fsdp2" / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["num_processes"] == 2 and state["distributed_type"] == "DistributedType.FSDP"
    finetune(quick_run(tokenizer, root / "lora-single", per_device_train_batch_size=4, **lora))
    merged = weights(root / "lora-fsdp2")
    assert not any("lora" in name for name in merged)  # a plain model, adapters merged in
    assert max_abs_diff(merged, weights(root / "lora-single")) < 1e-6
    assert max_abs_diff(merged, weights(root / "single")) > 1e-5  # the adapters changed the weights


def test_fsdp2_harness_refuses_a_single_process(tmp_path):
    """The harness is only for real multi-process runs: one process would silently test nothing."""
    done = launch(["--num_processes", "1", "--cpu", "tests/distributed/fsdp2_on_cpu.py", "recipes/pretrain.py"])
    assert done.returncode != 0
    assert "expected >= 2 CPU processes" in done.stdout + done.stderr


def test_resume_with_another_process_count_is_refused_before_loading(shared):
    root, tokenizer = shared
    checkpoint = root / "fsdp2" / "checkpoint-2"
    if not checkpoint.is_dir():
        pytest.skip("needs the fsdp2 run above")
    one = quick_run(
        tokenizer, root / "fsdp2-one", per_device_train_batch_size=4, resume_from_checkpoint=str(checkpoint), **COMMON
    )
    with pytest.raises(ValueError, match="holds shards from 2 processes under DistributedType.FSDP; this run is 1"):
        pretrain(one)
    assert not (root / "fsdp2-one" / "model.safetensors").exists()
