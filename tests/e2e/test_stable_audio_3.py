"""The stable_audio_3 family end to end on a tiny random StableAudio3Pipeline in Stable Audio 3's layout (a stereo
44.1 kHz AutoencoderSAME with its 4096-sample hop, a T5Gemma encoder and a left-padding Gemma tokenizer, a DiT with
differential attention and memory tokens, the duration embedder, FlowMatchEulerDiscreteScheduler reading t itself):
the checkpoint alone chooses the family, lr 0 exports the source bit for bit, the family's sampler is the pipeline's,
training on one clip moves the exported pipeline towards it, LoRA and full fine-tunes keep T5Gemma and the VAE byte for
byte, a resumed LoRA run ends where a straight one does, the issue's command works, and bad inputs are refused before
training."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict
from safetensors.torch import load_file, save_file

from hf_audio_trainer import finetune
from hf_audio_trainer.errors import ConfigError
from tests.helpers import launch, max_abs_diff, stable_audio_3_quick_run, tiny_stable_audio_3, weights

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

FROZEN = ("text_encoder", "tokenizer", "vae", "scheduler")
RATE = 44100
PROMPT = "a melody played on a sine wave, clean"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return tiny_stable_audio_3(tmp_path_factory.mktemp("stable_audio_3") / "source")


def files(folder: Path, parts=FROZEN) -> dict[str, bytes]:
    """Every file of a pipeline's `parts` and its model_index.json, by path, as bytes."""
    found = {"model_index.json": (folder / "model_index.json").read_bytes()}
    for part in parts:
        found.update(
            {str(p.relative_to(folder)): p.read_bytes() for p in sorted((folder / part).rglob("*")) if p.is_file()}
        )
    return found


def pipeline(folder):
    from diffusers import StableAudio3Pipeline

    pipe = StableAudio3Pipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(folder, seed: int = 0, **kwargs) -> torch.Tensor:
    settings = {"duration": 1.0, "num_inference_steps": 8, "guidance_scale": 3.0, **kwargs}
    return pipeline(folder)(PROMPT, generator=torch.Generator().manual_seed(seed), **settings).audios[0]


def test_lr_0_exports_the_source_bit_for_bit_and_generates_what_it_generates(source, tmp_path):
    out = tmp_path / "lr0"
    finetune(stable_audio_3_quick_run(source, out, max_steps=2, learning_rate=0.0, save_steps=2))  # no --model_family
    config = json.loads((out / "run_config.json").read_text())
    assert config["model_family"] == "stable_audio_3" and config["lr_scheduler_type"] == "constant"  # its recipe
    theirs, ours = weights(source), weights(out)
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in theirs)
    assert any(k.startswith("duration_embedder.") for k in ours)
    assert files(out) == files(source)  # the frozen parts, the scheduler and the index, byte for byte
    a, b = generate(source), generate(out)
    assert type(pipeline(out)).__name__ == "StableAudio3Pipeline"
    assert a.shape == (2, RATE) and torch.equal(a, b)
    print(f"lr 0: transformer and duration embedder equal bit for bit; generation max |diff| {(a - b).abs().max()}")


@pytest.mark.parametrize("stochastic", [False, True], ids=["euler", "ping-pong"])
def test_the_family_samples_exactly_what_the_pipeline_samples(tmp_path, stochastic):
    """Prompts tokenised, padded and encoded as the pipeline does (left padding, T5Gemma's positions), the null
    condition of guidance, the duration, the log-SNR schedule and the DiT's time input: from the same noise and seed,
    the family's sampler gives the pipeline's latents, with deterministic and with ping-pong (stochastic) steps."""
    from hf_audio_trainer.families.flow import padded_states
    from hf_audio_trainer.families.stable_audio_3 import (
        PromptEncoder,
        load_pipeline_model,
        prompt_ids,
        sample_latents,
    )

    source = tiny_stable_audio_3(tmp_path / "source", stochastic=stochastic)
    pipe = pipeline(source)
    prompts = [PROMPT, "an arpeggio on a square-wave synth"]
    seconds, channels = 1.3, pipe.vae.config.latent_dim
    frames = int(np.ceil(seconds * RATE / pipe.vae.downsampling_ratio))
    noise = torch.randn(2, channels, frames, generator=torch.Generator().manual_seed(1))
    theirs = pipe(prompts, duration=seconds, num_inference_steps=6, guidance_scale=3.0, latents=noise.clone(),
                  generator=torch.Generator().manual_seed(5), output_type="latent").audios  # fmt: skip
    encode = PromptEncoder(pipe.tokenizer)
    states, mask = padded_states(encode(pipe.text_encoder, prompt_ids(pipe.tokenizer, prompts), "cpu"),
                                 encode.length, encode.side)  # fmt: skip
    embeds, their_mask = pipe.encode_prompt(prompts, "cpu", 1)
    assert torch.equal(mask, their_mask) and torch.equal(states[mask.bool()], embeds[their_mask.bool()])
    model = load_pipeline_model(str(source)).eval()
    null = encode(pipe.text_encoder, [pipe.tokenizer("")["input_ids"]], "cpu")
    model.set_null(*(x[0] for x in padded_states(null, encode.length, encode.side)))
    ours = sample_latents(model, states, mask, seconds, channels, RATE / pipe.vae.downsampling_ratio, 3.0, 6,
                          pipe.scheduler, generator=torch.Generator().manual_seed(5), noise=noise)  # fmt: skip
    error = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    print(f"sampler vs pipeline ({'ping-pong' if stochastic else 'euler'}): max relative |diff| {error:.2e}")
    assert error < 1e-5


def test_a_distilled_checkpoint_fine_tunes_with_a_note(tmp_path, capsys):
    """A pipeline whose scheduler samples ping-pong (the distilled model) trains, with one line saying what that does
    to the distillation; its export keeps the scheduler."""
    source = tiny_stable_audio_3(tmp_path / "distilled", stochastic=True)
    out = tmp_path / "out"
    assert finetune(stable_audio_3_quick_run(source, out, max_steps=2)).global_step == 2
    assert "samples with stochastic_sampling (a distilled Stable Audio 3)" in capsys.readouterr().out
    assert pipeline(out).scheduler.config.stochastic_sampling


def one_clip_dataset(folder: Path) -> tuple[Path, np.ndarray]:
    """One stereo 1-s clip (a sine left, a square wave right) with one prompt: 8 training rows, 1 validation row."""
    t = np.arange(RATE) / RATE
    clip = np.stack([np.sin(2 * np.pi * 440 * t), 0.5 * np.sign(np.sin(2 * np.pi * 220 * t))]).astype(np.float32)
    rows = {"audio": [{"array": clip, "sampling_rate": RATE}] * 8, "description": [PROMPT] * 8}
    first = {k: v[:1] for k, v in rows.items()}
    DatasetDict({"train": Dataset.from_dict(rows), "validation": Dataset.from_dict(first)}).save_to_disk(str(folder))
    return folder, clip


def test_a_fine_tune_on_one_clip_generates_it_through_the_exported_pipeline(source, tmp_path):
    """Rectified flow at the DiT's time scale is what the exported scheduler samples: after 250 steps on one clip and
    one prompt, the pipeline generates, from new seeds, latents far closer to that clip's (its VAE's unit-scale
    latents) than the untrained model does, and closer than silence is. (The tiny random SAME decoder renders
    different latents almost alike, so distances are measured where the model generates: in latent space.)"""
    data, clip = one_clip_dataset(tmp_path / "one_clip")
    out = tmp_path / "fit"
    finetune(stable_audio_3_quick_run(
        source, out, dataset_name=str(data), max_steps=250, learning_rate=1e-2, per_device_train_batch_size=8,
        lr_scheduler_type="constant_with_warmup", warmup_steps=10, condition_dropout=0.1, logging_steps=50,
    ))  # fmt: skip
    pipe = pipeline(source)
    hop = pipe.vae.downsampling_ratio
    frames = RATE // hop  # what training encodes: the clip's whole latent frames
    with torch.no_grad():
        target = pipe.vae.encode(torch.from_numpy(clip)[None, :, : frames * hop]).latents[0]
    seconds = frames * hop / RATE  # the duration whose generation is exactly those frames
    distances = {}
    for name, folder in (("untrained", source), ("fine-tuned", out)):
        for seed in (11, 12, 13):
            latents = generate(folder, seed, duration=seconds, num_inference_steps=20, output_type="latent")
            assert latents.shape == target.shape
            distances.setdefault(name, []).append(((latents - target) ** 2).mean().item())
    power = (target**2).mean().item()  # the distance of silence (all-zero latents)
    means = {name: float(np.mean(v)) for name, v in distances.items()}
    print(f"one-clip mean squared latent distance over 3 seeds: {means} (the target's power {power:.3f})")
    assert means["fine-tuned"] < 0.2 * means["untrained"] and means["fine-tuned"] < 0.2 * power
    assert max(distances["fine-tuned"]) < min(distances["untrained"])  # every seed, not the mean


def test_lora_and_full_fine_tunes_keep_t5gemma_and_the_vae_and_export_loadable_pipelines(source, tmp_path):
    from diffusers import StableAudio3DiTModel
    from peft import PeftModel

    original = weights(source)
    DIT = "to_qkv,to_q,to_kv,to_out,ff.proj_in,ff.proj_out"  # the family's default LoRA targets
    runs = {
        "lora": {"use_peft": True},
        "full": {},
        "full with the duration embedder": {"train_duration_embedder": True},
        "lora with the duration embedder": {"use_peft": True, "lora_target_modules": f"{DIT},duration_embedder.linear"},
    }
    moved = {}
    for kind, extra in runs.items():
        out = tmp_path / kind.replace(" ", "_")
        finetune(stable_audio_3_quick_run(source, out, max_steps=3, save_steps=3, learning_rate=1e-2, **extra))
        assert files(out) == files(source)  # T5Gemma, tokenizer, VAE, scheduler: byte for byte
        trained = weights(out)
        assert not any("lora" in k for k in trained) and trained.keys() == original.keys()
        moved[kind] = {k for k in trained if not torch.equal(trained[k], original[k])}
        assert any(k.startswith("transformer.") for k in moved[kind])
        assert not any("to_local_embed" in k for k in moved[kind])  # the inpainting input is never trained
        audio = generate(out)
        assert audio.shape == (2, RATE) and torch.isfinite(audio).all()
        if kind == "lora":  # the adapter beside the export applies to the source's DiT as peft loads it
            dit = PeftModel.from_pretrained(StableAudio3DiTModel.from_pretrained(source, subfolder="transformer"),
                                            out / "transformer_lora").merge_and_unload()  # fmt: skip
            merged = {f"transformer.{k}": v for k, v in dit.state_dict().items()}
            assert max_abs_diff(merged, {k: v for k, v in trained.items() if k.startswith("transformer.")}) < 1e-6
        else:
            assert not (out / "transformer_lora").exists()
    for kind in ("lora", "full"):
        assert not any(k.startswith("duration_embedder.") for k in moved[kind]), kind  # frozen unless asked
    for kind in ("full with the duration embedder", "lora with the duration embedder"):
        assert "duration_embedder.linear.weight" in moved[kind], kind
    print({kind: len(keys) for kind, keys in moved.items()})


def test_a_resumed_lora_run_ends_where_a_straight_one_does(source, tmp_path):
    settings = dict(max_steps=4, save_steps=2, use_peft=True, condition_dropout=0.5, per_device_train_batch_size=2,
                    learning_rate=1e-2)  # fmt: skip
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    finetune(stable_audio_3_quick_run(source, straight, **settings))
    finetune(stable_audio_3_quick_run(source, resumed, resume_from_checkpoint=str(straight / "checkpoint-2"),
                                      **settings))  # fmt: skip
    assert max_abs_diff(weights(straight), weights(resumed)) == 0.0
    assert max_abs_diff(weights(straight), weights(source)) > 1e-4


def test_in_loop_samples_come_from_the_pipelines_sampler_and_are_scored(source, tmp_path):
    """The sample pass generates from validation descriptions with the source's scheduler and log-SNR schedule
    (guided, 4 steps) and scores FAD against the validation clips."""
    from hf_audio_trainer.trackers import read_metrics

    out = tmp_path / "fad"
    finetune(stable_audio_3_quick_run(
        source, out, max_steps=2, eval_steps=2, synthetic_num_clips=80, fad_embedder="mel", num_eval_samples=2,
        eval_sample_seconds=1.0, num_inference_steps=4, guidance_scale=3.0,
    ))  # fmt: skip
    scored = [m for m in read_metrics(out) if "eval/fad" in m]
    assert scored and np.isfinite(scored[-1]["eval/fad"]) and scored[-1]["eval/fad_num_samples"] == 2


def test_diffusion_dpo_with_rectified_flow_separates_chosen_from_rejected_and_exports_the_pipeline(source, tmp_path):
    """align from the pipeline alone (align_stable_audio_3.yaml's beta 2000): the chosen members' velocity error falls
    below the rejected ones' against the frozen reference, on the training pairs and the held-out ones; with the
    reference's terms precomputed it runs too."""
    from hf_audio_trainer import align
    from hf_audio_trainer.trackers import read_metrics

    settings = {
        "model_name_or_path": str(source), "report_to": "none", "synthetic_num_pairs": 18, "max_steps": 60,
        "eval_steps": 60, "eval_on_start": True, "save_steps": 1000, "logging_steps": 10,
        "per_device_train_batch_size": 8, "max_duration_seconds": 1.0, "learning_rate": 1e-4, "warmup_steps": 0,
    }  # fmt: skip
    out = tmp_path / "align"
    assert align({**settings, "output_dir": str(out)}).global_step == 60
    config = json.loads((out / "run_config.json").read_text())
    assert config["model_family"] == "stable_audio_3" and config["beta"] == 2000.0
    metrics = read_metrics(out)
    evals = [m for m in metrics if "eval/rewards/margins" in m]
    assert [m["step"] for m in evals] == [0, 60] and evals[0]["eval/rewards/margins"] == 0  # the policy starts as it
    print(f"DPO held-out margin {evals[0]['eval/rewards/margins']} -> {evals[-1]['eval/rewards/margins']:.3f}, "
          f"accuracy -> {evals[-1]['eval/rewards/accuracies']}, loss -> {evals[-1]['eval/loss']:.4f}")  # fmt: skip
    assert evals[-1]["eval/rewards/margins"] > 0 and evals[-1]["eval/loss"] < 0.6931
    assert [m["train/loss"] for m in metrics if "train/loss" in m][-1] < 0.6931
    assert files(out) == files(source) and max_abs_diff(weights(out), weights(source)) > 0
    assert generate(out).shape == (2, RATE)
    precomputed = {**settings, "output_dir": str(tmp_path / "precomputed"), "max_steps": 2, "eval_steps": 2}
    assert align({**precomputed, "precompute_ref_log_probs": True}).global_step == 2


def stereo_folder(folder: Path, channels: int = 2, rate: int = 48000, count: int = 6) -> Path:
    """A user's dataset: wav files (stereo at 48 kHz unless said) with a metadata.csv of descriptions."""
    import soundfile as sf

    folder.mkdir(parents=True, exist_ok=True)
    rows = ["file_name,description"]
    rng = np.random.default_rng(0)
    for i in range(count):
        t = np.arange(int(rate * (0.6 + 0.1 * i))) / rate
        wave = np.stack([np.sin(2 * np.pi * (220 + 40 * i + 7 * c) * t) for c in range(channels)], axis=1) * 0.5
        sf.write(folder / f"clip{i}.wav", (wave + 0.01 * rng.standard_normal(wave.shape)).astype(np.float32), rate)
        rows.append(f'clip{i}.wav,"a melody of {i + 2} notes played on a sine tone"')
    (folder / "metadata.csv").write_text("\n".join(rows) + "\n")
    return folder


def test_the_issues_command_fine_tunes_with_lora_from_the_recipe_defaults(source, tmp_path):
    """`accelerate launch recipes/finetune.py --model_name_or_path <pipeline> --dataset_name my_music/ --use_peft`:
    the checkpoint picks the family and recipes/configs/finetune_stable_audio_3.yaml; stereo 48 kHz files are read as
    stereo at the VAE's 44.1 kHz; the folder that comes back is a StableAudio3Pipeline diffusers loads alone."""
    data = stereo_folder(tmp_path / "my_music")
    out = tmp_path / "recipe"
    flags = ["--model_name_or_path", str(source), "--dataset_name", str(data), "--use_peft", "true", "--max_steps", "2",
             "--eval_steps", "2", "--save_steps", "2", "--output_dir", str(out), "--report_to", "none",
             "--num_inference_steps", "4", "--eval_sample_seconds", "1"]  # fmt: skip
    done = launch(["--num_processes", "1", "recipes/finetune.py", *flags])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "the audio is mono" not in done.stdout
    config = json.loads((out / "run_config.json").read_text())
    expected = {"model_family": "stable_audio_3", "learning_rate": 1e-4, "weight_decay": 0.0, "lr_scheduler_type":
                "constant", "max_grad_norm": 0.0, "ema": False, "condition_dropout": 0.1, "lora_r": 16,
                "lora_alpha": 16, "lora_dropout": 0.0, "segment_seconds": 120.0, "seed": 42}  # fmt: skip
    assert {k: config[k] for k in expected} == expected
    assert (out / "transformer_lora" / "adapter_config.json").is_file()
    script = (
        "import sys, torch\n"
        "from diffusers import StableAudio3Pipeline\n"
        f"pipe = StableAudio3Pipeline.from_pretrained({str(out)!r})\n"
        "g = torch.Generator().manual_seed(0)\n"
        "audio = pipe('a melody', duration=1.0, num_inference_steps=4, guidance_scale=3.0, generator=g).audios\n"
        "assert audio.shape == (1, 2, 44100) and torch.isfinite(audio).all(), audio.shape\n"
        "assert not any(m.startswith('hf_audio_trainer') for m in sys.modules)\n"
        "print('ok', pipe.vae.config.sampling_rate, type(pipe.scheduler).__name__)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd="/", capture_output=True, text=True, timeout=300,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-3:] == ["ok", "44100", "FlowMatchEulerDiscreteScheduler"]


def variant(source: Path, folder: Path, index: dict | None = None, scheduler: dict | None = None) -> Path:
    """A copy of the source pipeline with its model_index.json or scheduler config changed."""
    shutil.copytree(source, folder)
    if index is not None:
        path = folder / "model_index.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **index}))
    if scheduler is not None:
        path = folder / "scheduler" / "scheduler_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **scheduler}))
    return folder


def test_bad_inputs_are_refused_by_name_before_training(source, tmp_path):
    def run(name, **overrides):
        return stable_audio_3_quick_run(overrides.pop("model_name_or_path", source), tmp_path / name, max_steps=2,
                                        **overrides)  # fmt: skip

    other = variant(source, tmp_path / "audioldm", index={"_class_name": "AudioLDM2Pipeline"})
    with pytest.raises(ConfigError, match="is a AudioLDM2Pipeline.*which no model family trains; the toolkit trains"):
        finetune(run("a", model_name_or_path=other))
    with pytest.raises(ConfigError, match="is a AudioLDM2Pipeline; the stable_audio_3 family fine-tunes a "
                       "StableAudio3Pipeline"):  # fmt: skip
        finetune(run("b", model_name_or_path=other, model_family="stable_audio_3"))
    with pytest.raises(ConfigError, match=r"--model_family stable_audio, but .* is a StableAudio3Pipeline with a "
                       "FlowMatchEulerDiscreteScheduler, which the stable_audio_3 family trains"):  # fmt: skip
        finetune(run("c", model_family="stable_audio"))
    unipc = variant(source, tmp_path / "unipc", index={"scheduler": ["diffusers", "UniPCMultistepScheduler"]})
    with pytest.raises(ConfigError, match="samples with UniPCMultistepScheduler, not FlowMatchEulerDiscreteScheduler"):
        finetune(run("d", model_name_or_path=unipc))
    dynamic = variant(source, tmp_path / "dynamic", scheduler={"use_dynamic_shifting": True})
    with pytest.raises(ConfigError, match="scheduler sets use_dynamic_shifting: StableAudio3Pipeline passes no mu"):
        finetune(run("e", model_name_or_path=dynamic))
    with pytest.raises(ConfigError, match="--train_duration_embedder with --use_peft: LoRA trains the modules"):
        finetune(run("f", use_peft=True, train_duration_embedder=True))
    with pytest.raises(ConfigError, match="--train_text_encoder: Stable Audio 3's T5Gemma stays frozen"):
        finetune(run("g", train_text_encoder=True))
    with pytest.raises(ConfigError, match=r"--sample_rate: the stable_audio_3 family does not read them; they are the "
                       "flow family's"):  # fmt: skip
        finetune(run("h", sample_rate=16000))
    with pytest.raises(ConfigError, match="logsnr_min=3.0, logsnr_max=2.0: the first must be below the second"):
        finetune(run("i", logsnr_min=3.0))
    with pytest.raises(
        ConfigError, match=r"quad/clip\d.wav \(train row \d\) has 4 channels and the model reads 2; downmix"
    ):
        finetune(run("j", dataset_name=str(stereo_folder(tmp_path / "quad", channels=4, count=3)),
                     preprocessing_cache_dir=str(tmp_path / "cache")))  # fmt: skip
    short = variant(source, tmp_path / "short")
    config = short / "duration_embedder" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "max_val": 0.5}))
    with pytest.raises(ConfigError, match=r"clips last up to 0.9 s but .* duration embedder encodes at most 0.5 s"):
        finetune(run("k", model_name_or_path=short))
    # a checkpoint with a weight missing is refused, never initialised anew
    broken = variant(source, tmp_path / "broken")
    dit = broken / "transformer" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(dit)
    del tensors["proj_out.weight"]
    save_file(tensors, dit)
    with pytest.raises(
        ConfigError, match=r"does not fit a StableAudio3DiTModel: 1 MISSING \(e.g. \['proj_out.weight'\]\)"
    ):
        finetune(run("l", model_name_or_path=broken))
    partless = variant(source, tmp_path / "partless")
    shutil.rmtree(partless / "duration_embedder")
    with pytest.raises(ConfigError, match="its pipeline has no duration_embedder; pass a whole one"):
        finetune(run("m", model_name_or_path=partless))
    assert not any((tmp_path / name / "metrics.jsonl").exists() for name in "abcdefghijklm")
