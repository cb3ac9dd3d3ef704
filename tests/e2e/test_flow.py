"""The flow family end to end on tiny models: fixed-noise validation, exact accumulation, the StableAudioPipeline
export (loaded and run by diffusers alone, and sampled exactly as in the loop), fine-tuning from it, Diffusion-DPO,
and bad inputs refused before training."""

import json
import subprocess
import sys

import pytest
import torch

from hf_audio_trainer import align, finetune, pretrain
from hf_audio_trainer.errors import ConfigError
from hf_audio_trainer.trackers import read_metrics
from tests.helpers import (
    ROOT,
    fit_small_tokenizer,
    flow_quick_run,
    max_abs_diff,
    quick_run,
    tiny_stable_audio,
    weights,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


def flow_run(output_dir, **overrides) -> dict:
    return flow_quick_run(output_dir, **overrides)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A short pretrain with EMA and in-loop FAD: its folder is a pipeline."""
    out = tmp_path_factory.mktemp("flow") / "pretrain"
    pretrain(flow_run(out, max_steps=6, eval_steps=3, eval_on_start=True, fad_embedder="mel", num_eval_samples=4,
                      eval_sample_seconds=1.0, num_inference_steps=4, ema=True, ema_power=0.75))  # fmt: skip
    return out


def test_fixed_noise_validation_is_identical_for_the_same_weights_at_other_steps(tmp_path):
    out = tmp_path / "lr0"
    pretrain(flow_run(out, max_steps=4, eval_steps=2, eval_on_start=True, learning_rate=0.0, condition_dropout=0.5))
    evals = [m for m in read_metrics(out) if "eval/loss" in m]
    assert [m["step"] for m in evals] == [0, 2, 4]
    # the same weights (lr 0), other steps and training draws in between: the very same number
    assert len({m["eval/loss"] for m in evals}) == 1 and len({m["eval/loss_uncond"] for m in evals}) == 1
    assert evals[0]["eval/loss"] != evals[0]["eval/loss_uncond"]  # the text is seen


def test_accumulation_2x2_equals_4x1(tmp_path):
    a = flow_run(tmp_path / "2x2", max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                 condition_dropout=0.5, max_duration_seconds=2.0, segment_seconds=1.0)  # fmt: skip
    b = {**a, "output_dir": str(tmp_path / "4x1"), "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1}
    pretrain(a)
    pretrain(b)
    assert max_abs_diff(weights(tmp_path / "2x2"), weights(tmp_path / "4x1")) < 1e-6
    assert read_metrics(tmp_path / "2x2")[-1]["train/null_condition"] > 0  # dropout drew the null condition


def test_pretrain_logs_validation_fad_and_exports_a_pipeline_with_its_ema(exported):
    evals = [m for m in read_metrics(exported) if "eval/fad" in m]
    assert [m["step"] for m in evals] == [0, 3, 6]
    assert all(m["eval/fad_num_samples"] == 4 and m["eval/fad"] > 0 for m in evals)
    assert all("eval/loss_ema" in m for m in evals)
    index = json.loads((exported / "model_index.json").read_text())
    assert index["_class_name"] == "StableAudioPipeline" and index["transformer"][1] == "StableAudioDiTModel"
    stats = json.loads((exported / "latents.json").read_text())
    assert len(stats["mean"]) == len(stats["std"]) == 64 and stats["vae"] == "block-dct-64"
    assert max_abs_diff(weights(exported), weights(exported / "ema")) > 0  # the EMA is its own weights


def test_the_export_generates_with_diffusers_alone(exported):
    script = (
        "import sys, torch\n"
        "from diffusers import StableAudioPipeline\n"
        f"pipe = StableAudioPipeline.from_pretrained({str(exported)!r})\n"
        "g = torch.Generator().manual_seed(0)\n"
        "audio = pipe('a melody on a sine wave', audio_end_in_s=0.5, num_inference_steps=3, generator=g).audios\n"
        "assert audio.shape == (1, 1, 8000) and torch.isfinite(audio).all(), audio.shape\n"
        "assert not any(m.startswith('hf_audio_trainer') for m in sys.modules)\n"
        "print('ok', pipe.vae.config.sampling_rate)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd="/", capture_output=True, text=True, timeout=300,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-2:] == ["ok", "16000"]


def test_the_pipeline_samples_exactly_what_the_loop_samples(exported):
    """The training-time conditioning (projected text masked, seconds tokens, null condition, rotary positions) is
    the pipeline's: from the same noise, our sampler with the pipeline's scheduler gives the pipeline's latents."""
    from diffusers import StableAudioPipeline

    from hf_audio_trainer.data.text import encode_texts
    from hf_audio_trainer.families.flow import load_flow_model, padded_states, sample_latents

    pipe = StableAudioPipeline.from_pretrained(exported)
    model = load_flow_model(str(exported)).eval()
    prompts = ["a melody on a sine wave, clean", "an arpeggio on a square wave"]
    frames = pipe.transformer.config.sample_size
    noise = torch.randn(2, 64, frames, generator=torch.Generator().manual_seed(1))
    seconds = frames * pipe.vae.hop_length / pipe.vae.config.sampling_rate
    theirs = pipe(prompts, audio_end_in_s=seconds, num_inference_steps=4, guidance_scale=3.0, latents=noise.clone(),
                  output_type="latent").audios  # fmt: skip
    length = pipe.tokenizer.model_max_length
    ids = [pipe.tokenizer(p, truncation=True, max_length=length)["input_ids"] for p in prompts]
    states, mask = padded_states(encode_texts(pipe.text_encoder, ids, "cpu"), length)
    ours = sample_latents(model, states, mask, seconds, frames, 64, 3.0, 4, scheduler=pipe.scheduler, noise=noise)
    assert (ours - theirs).abs().max() < 1e-4 * theirs.abs().max()


def test_finetune_at_lr_0_exports_the_input_and_a_resumed_finetune_reads_the_checkpoint_latents(exported, tmp_path):
    out = tmp_path / "finetune"
    finetune(flow_run(out, model_name_or_path=str(exported), max_steps=2, learning_rate=0.0, high_quality_only=False))
    assert max_abs_diff(weights(out), weights(exported)) == 0.0
    for part in ("vae", "text_encoder"):  # the frozen parts travel unchanged
        a = exported / part / ("diffusion_pytorch_model.safetensors" if part == "vae" else "model.safetensors")
        b = out / a.relative_to(exported)
        assert a.read_bytes() == b.read_bytes()


def test_a_lora_fine_tune_exports_a_pipeline_with_the_adapters_merged(exported, tmp_path):
    """--use_peft: the export is a StableAudioPipeline whose DiT holds the merged adapters (it used to be a bare peft
    adapter folder that diffusers could not load)."""
    from diffusers import StableAudioPipeline

    out = tmp_path / "lora"
    finetune(flow_run(out, model_name_or_path=str(exported), max_steps=2, use_peft=True, high_quality_only=False))
    assert not (out / "adapter_model.safetensors").exists()
    trained = weights(out)
    assert not any("lora" in k for k in trained) and trained.keys() == weights(exported).keys()
    assert max_abs_diff(trained, weights(exported)) > 0
    assert type(StableAudioPipeline.from_pretrained(out).transformer).__name__ == "StableAudioDiTModel"


def test_diffusion_dpo_raises_held_out_reward_accuracy(exported, tmp_path):
    out = tmp_path / "align"
    result = align({
        "model_family": "flow", "model_name_or_path": str(exported), "output_dir": str(out), "report_to": "none",
        "synthetic_num_pairs": 80, "max_steps": 30, "eval_steps": 30, "eval_on_start": True, "logging_steps": 10,
        "save_steps": 1000, "per_device_train_batch_size": 8, "max_duration_seconds": 1.0, "learning_rate": 3e-3,
        "beta": 2000.0,
    })  # fmt: skip
    evals = [m for m in read_metrics(out) if "eval/rewards/accuracies" in m]
    assert [m["step"] for m in evals] == [0, 30] and result.global_step == 30
    # the policy starts as the reference: every reward 0, no held-out pair ranked right
    assert evals[0]["eval/rewards/margins"] == 0 and evals[0]["eval/rewards/accuracies"] == 0
    assert evals[-1]["eval/rewards/accuracies"] > 0.5 and evals[-1]["eval/rewards/margins"] > 0


def test_bad_flow_inputs_are_refused_before_training(exported, tmp_path):
    with pytest.raises(ConfigError, match="could not load an AutoencoderOobleck"):
        pretrain(flow_run(tmp_path / "a", vae=str(tmp_path), max_steps=2))
    stereo = tiny_stable_audio(tmp_path / "sao") / "vae"  # Stable Audio Open's kind of VAE: stereo
    with pytest.raises(ConfigError, match="has 2 audio channels; the flow family trains over a mono VAE"):
        pretrain(flow_run(tmp_path / "a2", vae=str(stereo), max_steps=2))
    with pytest.raises(ConfigError, match=r"weighting_scheme='uniform': choose one of"):
        pretrain(flow_run(tmp_path / "b", weighting_scheme="uniform", max_steps=2))
    with pytest.raises(ConfigError, match="the musicgen family does not read them; they are the flow family's"):
        pretrain({"model_family": "musicgen", "vae": "x", "output_dir": str(tmp_path / "c")})
    mel = fit_small_tokenizer(tmp_path / "mel")
    musicgen = tmp_path / "musicgen"
    pretrain(quick_run(mel, musicgen, model_size="micro", max_steps=2))
    with pytest.raises(ConfigError, match="--model_family flow, but .* is a MusicgenForCausalLM, which the musicgen "
                       "family trains"):  # fmt: skip
        finetune(flow_run(tmp_path / "d", model_name_or_path=str(musicgen), max_steps=2))
    with pytest.raises(ConfigError, match="not a StableAudioPipeline folder"):  # a folder whose class says nothing
        finetune(flow_run(tmp_path / "d2", model_name_or_path=str(musicgen / "tokenizer"), max_steps=2))
    edm = tmp_path / "edm"  # a pipeline trained with another objective (Stable Audio Open's EDM scheduler)
    pipeline = json.loads((exported / "model_index.json").read_text())
    edm.mkdir()
    (edm / "model_index.json").write_text(
        json.dumps({**pipeline, "scheduler": ["diffusers", "CosineDPMSolverMultistepScheduler"]})
    )
    with pytest.raises(ConfigError, match="--model_family flow, but .* with a CosineDPMSolverMultistepScheduler, which "
                       "the stable_audio family trains"):  # fmt: skip
        finetune(flow_run(tmp_path / "e", model_name_or_path=str(edm), max_steps=2))
    assert not (tmp_path / "e" / "metrics.jsonl").exists()
    assert ROOT.is_dir()


def test_the_recipe_takes_the_flow_defaults_and_runs_end_to_end(tmp_path):
    """`accelerate launch recipes/pretrain.py --model_family flow` reads recipes/configs/pretrain_flow.yaml."""
    from tests.helpers import launch

    out = tmp_path / "recipe"
    flags = ["--model_family", "flow", "--model_size", "micro", "--max_steps", "4", "--synthetic_num_clips", "32",
             "--segment_seconds", "1.0", "--eval_steps", "4", "--num_eval_samples", "2", "--eval_sample_seconds",
             "0.5", "--num_inference_steps", "2", "--output_dir", str(out)]  # fmt: skip
    done = launch(["--num_processes", "1", "recipes/pretrain.py", *flags])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ema_power" in (out / "run_config.json").read_text()
    config = json.loads((out / "run_config.json").read_text())
    assert config["ema"] is True and config["ema_power"] == 0.75 and config["fad_embedder"] == "mel"
    assert [m["step"] for m in read_metrics(out) if "eval/fad" in m] == [0, 4]  # eval_on_start
    assert (out / "ema" / "model_index.json").is_file()


def test_on_policy_pairs_rank_pipeline_samples_and_align_on_them(exported, tmp_path):
    import numpy as np
    from datasets import DatasetDict

    from hf_audio_trainer.alignment import tonal_clarity
    from hf_audio_trainer.families.flow import make_flow_preference_pairs

    prompts = ["a melody played on a sine wave, clean", "an arpeggio played on a square wave, with heavy noise"] * 2
    pairs = make_flow_preference_pairs(str(exported), prompts, num_samples=3, seconds=0.5, num_inference_steps=3)
    assert 0 < len(pairs) <= len(prompts) and set(pairs.column_names) >= {"prompt", "chosen", "rejected"}
    assert all(c > r for c, r in zip(pairs["chosen_score"], pairs["rejected_score"], strict=True))
    chosen = pairs[0]["chosen"]
    assert chosen["sampling_rate"] == 16000 and len(chosen["array"]) == 8000
    # the stored audio is what was scored
    scores = [tonal_clarity(np.asarray(c["array"], dtype=np.float32), 16000) for c in pairs["chosen"]]
    np.testing.assert_allclose(scores, pairs["chosen_score"], rtol=1e-5)
    folder = tmp_path / "pairs"
    DatasetDict({"train": pairs, "validation": pairs.select(range(1))}).save_to_disk(str(folder))
    result = align({
        "model_family": "flow", "model_name_or_path": str(exported), "output_dir": str(tmp_path / "on-policy"),
        "report_to": "none", "dataset_name": str(folder), "max_steps": 2, "save_steps": 1000,
        "per_device_train_batch_size": 2, "max_duration_seconds": 1.0,
    })  # fmt: skip
    assert result.global_step == 2


def test_a_resume_with_another_latent_space_names_the_setting(tmp_path):
    out = tmp_path / "run"
    pretrain(flow_run(out, max_steps=2, save_steps=2))
    with pytest.raises(ConfigError, match=r"latent_hop_length=128 here, 64 in the checkpoint; resume with the"):
        pretrain(flow_run(out, max_steps=4, resume_from_checkpoint="latest", latent_hop_length=128))
    # the same settings resume
    assert pretrain(flow_run(out, max_steps=3, resume_from_checkpoint="latest")).global_step == 3
