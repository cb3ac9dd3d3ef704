"""DeepSpeed ZeRO-2 / ZeRO-3 and FSDP2 with two real CPU processes: the shipped configs train, checkpoint (sharded
where the strategy shards, EMA too), resume exactly and export one plain `from_pretrained` model equal to a
single-process run, raw and EMA. They also evaluate like one process on a validation split the ranks share
unevenly: under FSDP2 and ZeRO-3 a forward is a collective, so every rank must run as many forwards.

DeepSpeed runs on CPU with gloo (the recipe picks it when there is no GPU); its first run compiles a small
shared-memory op (about a minute, cached in ~/.cache/torch_extensions). FSDP2 goes through the test-only harness
`fsdp2_on_cpu.py`, because accelerate silently runs FSDP configs as DDP on CPU.
"""

import importlib.util
import json
import math
import subprocess

import pytest
from transformers import MusicgenForCausalLM

from hf_audio_trainer import align, finetune, pretrain
from hf_audio_trainer.trackers import read_metrics
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
# ZeRO-3 as it runs a large model: each forward gathers the parameters again. DeepSpeed keeps a parameter gathered
# when its next use comes within stage3_max_reuse_distance (1e9) parameters, so the tiny test model's would otherwise
# stay gathered from one eval forward to the next, and a rank with a forward fewer would not be noticed.
GATHER_EVERY_FORWARD = ["--use_deepspeed", "--deepspeed_config_file",
                        "tests/distributed/deepspeed_zero3_gather_every_forward.json"]  # fmt: skip
# the 3 validation clips in batches of 1 split as 2 eval batches on rank 0 and 1 on rank 1
COMMON = dict(max_steps=4, save_steps=2, eval_steps=2, ema=True, ema_decay=0.5, per_device_eval_batch_size=1)


def launch_strategy(
    strategy: str, settings: dict, port_offset: int = 0, recipe: str | None = None, config: list[str] | None = None
):
    config = config or STRATEGIES[strategy][0]
    args = [*config, "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(PORTS[strategy])]
    args[-1] = str(PORTS[strategy] + port_offset)
    script = ["tests/distributed/fsdp2_on_cpu.py"] if strategy == "fsdp2" else []
    recipe = recipe or ("recipes/align.py" if "synthetic_num_pairs" in settings else "recipes/pretrain.py")
    try:
        done = launch([*args, *script, recipe, *as_flags(settings)], timeout=400)
    except subprocess.TimeoutExpired as hung:  # a collective some rank never joined: say where the run stopped
        pytest.fail(f"{strategy} run still going after {hung.timeout} s, killed; last output:\n{hung.stderr[-3000:]}")
    if done.returncode != 0:  # the whole tail, untruncated (an assertion's repr would cut the middle out)
        pytest.fail(f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-8000:]}", pytrace=False)
    return done


def evaluations(folder) -> dict[tuple[int, str], float]:
    """Every eval/ number a run logged, by (step, name)."""
    return {(m["step"], k): v for m in read_metrics(folder) for k, v in m.items() if k.startswith("eval/")}


def assert_same_evaluations(folder, reference, expected: set[tuple[int, str]], ignore: str | None = None) -> None:
    """`folder`'s eval numbers are `reference`'s (names starting with `ignore` left out), `expected` among them."""
    ours = {key: value for key, value in evaluations(folder).items() if not (ignore and key[1].startswith(ignore))}
    theirs = evaluations(reference)
    assert expected <= ours.keys() and ours.keys() == theirs.keys(), (sorted(ours), sorted(theirs))
    for key, value in ours.items():
        assert value == pytest.approx(theirs[key], rel=1e-4, abs=1e-5), key


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
    # padding batches evened out the ranks' eval forwards and counted nothing: the single run's numbers, raw and EMA
    expected = {(step, f"eval/loss{suffix}") for step in (2, 4) for suffix in ("", "_ema")}
    assert_same_evaluations(this, single, expected)

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
    resumed_evaluations, straight_evaluations = evaluations(root / f"{strategy}-resumed"), evaluations(this)
    assert {(4, "eval/loss"), (4, "eval/loss_ema")} <= resumed_evaluations.keys()
    for key, value in resumed_evaluations.items():
        assert value == pytest.approx(straight_evaluations[key], rel=1e-5), key


@needs_deepspeed
@pytest.mark.long
def test_zero3_evaluates_a_split_the_ranks_share_unevenly_like_one_process(shared):
    """3 validation clips in batches of 1: rank 0 runs 2 eval forwards, rank 1 one and a padding batch. Every forward
    gathers the parameters from both ranks, so one forward fewer on rank 1 would leave rank 0 waiting in it. The
    clips sampled for FAD are generated alike: 2 on each rank, each in as many forwards."""
    root, tokenizer = shared
    uneven = dict(max_steps=2, save_steps=2, eval_steps=2, eval_on_start=True, per_device_eval_batch_size=1)
    fad = dict(fad_embedder="mel", num_eval_samples=3, eval_sample_seconds=0.5)
    run = quick_run(tokenizer, root / "zero3-gathering", per_device_train_batch_size=2, **uneven, **fad)
    launch_strategy("zero3", run, port_offset=6, config=GATHER_EVERY_FORWARD)
    state = json.loads((root / "zero3-gathering" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["num_processes"] == 2 and state["distributed_type"] == "DistributedType.DEEPSPEED"
    sampled = evaluations(root / "zero3-gathering")
    assert sampled[(2, "eval/fad_num_samples")] == 4 and math.isfinite(sampled[(2, "eval/fad")])
    pretrain(quick_run(tokenizer, root / "uneven-single", per_device_train_batch_size=4, **uneven))
    expected = {(0, "eval/loss"), (2, "eval/loss")}
    assert_same_evaluations(root / "zero3-gathering", root / "uneven-single", expected, ignore="eval/fad")


@needs_deepspeed
def test_align_under_zero3_equals_one_process(shared):
    """ZeRO-3 partitions the frozen reference as it loads: it gets an engine of its own and still scores like DDP.
    One validation pair for two processes: rank 1 evaluates a padding pair, whose policy and reference forwards
    match rank 0's, and reduces the same DPO metrics, all zero."""
    root, _ = shared

    def settings(out, **overrides):
        run = quick_run(None, out, model_name_or_path=str(root / "single"), synthetic_num_pairs=10, max_steps=3,
                        save_steps=3, eval_steps=3, learning_rate=1e-3, **overrides)  # fmt: skip
        del run["tokenizer"], run["synthetic_num_clips"]
        return run

    launch_strategy("zero3", settings(root / "align-zero3", per_device_train_batch_size=2), port_offset=2)
    state = json.loads((root / "align-zero3" / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["num_processes"] == 2 and state["distributed_type"] == "DistributedType.DEEPSPEED"
    single = align(settings(root / "align-single", per_device_train_batch_size=4))
    assert max_abs_diff(weights(root / "align-zero3"), weights(root / "align-single")) < 2e-5
    assert single.metrics["train/rewards/margins"] != 0.0  # the reference really scored: margins moved off zero
    dpo = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen")
    assert_same_evaluations(root / "align-zero3", root / "align-single", {(3, f"eval/{name}") for name in dpo})


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
