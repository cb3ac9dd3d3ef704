"""The stable_audio family end to end on a tiny random StableAudioPipeline in Stable Audio Open 1.0's layout (its
scheduler's config, a stereo 44.1 kHz AutoencoderOobleck, a T5 and its tokenizer): the checkpoint alone chooses the
family, lr 0 exports the source bit for bit, training with the v-objective moves the pipeline's own sampler towards
the data, LoRA and full fine-tunes keep T5 and the VAE byte for byte and export loadable stereo pipelines, and bad
inputs are refused before training."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from datasets import Dataset, DatasetDict
from safetensors.torch import load_file

from hf_audio_trainer import align, finetune, pretrain
from hf_audio_trainer.errors import ConfigError
from hf_audio_trainer.trackers import read_metrics
from tests.helpers import (
    ROOT,
    flow_quick_run,
    launch,
    max_abs_diff,
    stable_audio_quick_run,
    tiny_stable_audio,
    weights,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

FROZEN = ("text_encoder", "tokenizer", "vae", "scheduler")
RATE = 44100
PROMPT = "a melody played on a sine wave, clean"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return tiny_stable_audio(tmp_path_factory.mktemp("stable_audio") / "source")


def files(folder: Path, parts=FROZEN) -> dict[str, bytes]:
    """Every file of a pipeline's `parts` and its model_index.json, by path, as bytes."""
    found = {"model_index.json": (folder / "model_index.json").read_bytes()}
    for part in parts:
        found.update(
            {str(p.relative_to(folder)): p.read_bytes() for p in sorted((folder / part).rglob("*")) if p.is_file()}
        )
    return found


def generate(folder, seed: int = 0, **kwargs):
    from diffusers import StableAudioPipeline

    pipe = StableAudioPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    settings = {"audio_end_in_s": 1.0, "num_inference_steps": 8, "guidance_scale": 3.0, **kwargs}
    return pipe(PROMPT, generator=torch.Generator().manual_seed(seed), **settings).audios[0], pipe


def size_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def test_lr_0_exports_the_source_bit_for_bit_and_generates_what_it_generates(source, tmp_path, capsys):
    out = tmp_path / "lr0"
    finetune(stable_audio_quick_run(source, out, max_steps=2, learning_rate=0.0, save_steps=2))  # no --model_family
    config = json.loads((out / "run_config.json").read_text())
    assert config["model_family"] == "stable_audio" and config["lr_scheduler_type"] == "inverse_sqrt"  # its recipe
    assert "the audio is mono (train row 0) and the VAE reads 2 channels" in capsys.readouterr().out
    theirs, ours = weights(source), weights(out)
    assert all(torch.equal(theirs[k], ours[k]) for k in theirs) and theirs.keys() == ours.keys()
    assert files(out) == files(source)  # the frozen parts, the scheduler and the index, byte for byte
    a, pipe = generate(source)
    b, exported = generate(out)
    assert type(exported.scheduler).__name__ == "CosineDPMSolverMultistepScheduler"
    assert a.shape == (2, RATE) and torch.equal(a, b)
    print(f"lr 0: transformer and projection equal bit for bit; generation max |diff| {(a - b).abs().max().item()}")


def test_the_loop_samples_exactly_what_the_pipeline_samples(source):
    """Conditioning, the source's scheduler (its SDE noise seeded by the generator) and the DiT's time input are the
    pipeline's: from the same noise and seed, the family's sampler gives the pipeline's latents."""
    from diffusers import StableAudioPipeline

    from hf_audio_trainer.data.text import encode_texts
    from hf_audio_trainer.families.flow import load_pipeline_model, padded_states, sample_latents

    pipe = StableAudioPipeline.from_pretrained(source)
    pipe.set_progress_bar_config(disable=True)
    model = load_pipeline_model(str(source)).eval()
    prompts = [PROMPT, "an arpeggio on a square-wave synth"]
    frames = pipe.transformer.config.sample_size
    noise = torch.randn(2, 4, frames, generator=torch.Generator().manual_seed(1))
    theirs = pipe(prompts, audio_end_in_s=1.2, num_inference_steps=6, guidance_scale=3.0, latents=noise.clone(),
                  generator=torch.Generator().manual_seed(5), output_type="latent").audios  # fmt: skip
    length = pipe.tokenizer.model_max_length
    ids = [pipe.tokenizer(p, truncation=True, max_length=length)["input_ids"] for p in prompts]
    states, mask = padded_states(encode_texts(pipe.text_encoder, ids, "cpu"), length)
    ours = sample_latents(model, states, mask, 1.2, frames, 4, 3.0, 6, generator=torch.Generator().manual_seed(5),
                          scheduler=pipe.scheduler, noise=noise)  # fmt: skip
    assert (ours - theirs).abs().max() < 1e-4 * theirs.abs().max()


def one_clip_dataset(folder: Path) -> tuple[Path, np.ndarray]:
    """One stereo 1-s clip (a sine left, a square wave right) with one prompt: 8 training rows, 1 validation row."""
    t = np.arange(RATE) / RATE
    clip = np.stack([np.sin(2 * np.pi * 440 * t), 0.5 * np.sign(np.sin(2 * np.pi * 220 * t))]).astype(np.float32)
    rows = {"audio": [{"array": clip, "sampling_rate": RATE}] * 8, "description": [PROMPT] * 8}
    first = {k: v[:1] for k, v in rows.items()}
    DatasetDict({"train": Dataset.from_dict(rows), "validation": Dataset.from_dict(first)}).save_to_disk(str(folder))
    return folder, clip


def test_a_fine_tune_on_one_clip_generates_it_through_the_exported_pipeline(source, tmp_path):
    """The v-objective is what the exported scheduler samples: after 100 steps on one clip and one prompt, the
    pipeline (its own CosineDPMSolverMultistepScheduler) generates, from new seeds, latents and audio far closer to
    that clip than the untrained model does. The tiny VAE is random, so the audio compared is the clip as that VAE
    renders it (decode of encode: what any generation can at best become); to the raw clip both are equally far."""
    data, clip = one_clip_dataset(tmp_path / "one_clip")
    out = tmp_path / "fit"
    finetune(stable_audio_quick_run(
        source, out, dataset_name=str(data), max_steps=100, learning_rate=3e-3, per_device_train_batch_size=8,
        lr_scheduler_type="constant_with_warmup", warmup_steps=10, condition_dropout=0.1, logging_steps=50,
    ))  # fmt: skip
    _, pipe = generate(source)
    with torch.no_grad():
        padded = torch.zeros(1, 2, pipe.transformer.config.sample_size * pipe.vae.hop_length)
        padded[0, :, :RATE] = torch.from_numpy(clip)
        target = pipe.vae.encode(padded).latent_dist.mode()[0]
        rendered = pipe.vae.decode(target[None]).sample[0, :, :RATE]
    distances = {}
    for name, folder in (("untrained", source), ("fine-tuned", out)):
        for seed in (11, 12, 13):
            audio, _ = generate(folder, seed, num_inference_steps=20)
            latents, _ = generate(folder, seed, num_inference_steps=20, output_type="latent")
            row = distances.setdefault(name, {"latent": [], "audio to the rendered clip": [], "audio to the clip": []})
            row["latent"].append(((latents - target) ** 2).mean().item())
            row["audio to the rendered clip"].append(((audio - rendered) ** 2).mean().item())
            row["audio to the clip"].append(((audio - torch.from_numpy(clip)) ** 2).mean().item())
    means = {name: {k: float(np.mean(v)) for k, v in row.items()} for name, row in distances.items()}
    print(f"one-clip mean squared distances over 3 seeds: {means} (target latent power {(target**2).mean():.3f})")
    before, after = means["untrained"], means["fine-tuned"]
    assert after["latent"] < 0.35 * before["latent"]
    assert after["audio to the rendered clip"] < 0.1 * before["audio to the rendered clip"]
    assert max(distances["fine-tuned"]["latent"]) < min(distances["untrained"]["latent"])  # every seed, not the mean


def test_lora_and_full_fine_tunes_keep_t5_and_the_vae_and_export_stereo_pipelines(source, tmp_path):
    from peft import PeftModel

    from hf_audio_trainer.families.flow import load_pipeline_model

    sizes = {}
    for kind, extra in (("full", {}), ("lora", {"use_peft": True, "lora_dropout": 0.0})):
        out = tmp_path / kind
        finetune(stable_audio_quick_run(source, out, max_steps=3, save_steps=3, learning_rate=1e-2, **extra))
        assert files(out) == files(source)  # T5, tokenizer, VAE, scheduler: byte for byte
        trained, original = weights(out), weights(source)
        assert not any("lora" in k for k in trained) and trained.keys() == original.keys()
        moved = {k for k in trained if not torch.equal(trained[k], original[k])}
        assert any(k.startswith("transformer.") for k in moved)
        audio, _ = generate(out)
        assert audio.shape == (2, RATE) and torch.isfinite(audio).all()
        checkpoint = out / "checkpoint-3"
        sizes[kind] = {"checkpoint MB": round(size_mb(checkpoint), 3), "export MB": round(size_mb(out), 3)}
        optimizer = torch.load(checkpoint / "optimizer.bin", weights_only=True)["state"]
        state_numel = sum(t.numel() for s in optimizer.values() for t in s.values() if t.ndim > 0)
        if kind == "lora":
            assert not any(k.startswith("projection_model.") for k in moved)  # LoRA is the DiT's alone
            # the adapter beside the export applies to the source's DiT as peft loads it, giving the merged DiT
            from diffusers import StableAudioDiTModel

            dit = PeftModel.from_pretrained(StableAudioDiTModel.from_pretrained(source, subfolder="transformer"),
                                            out / "transformer_lora").merge_and_unload()  # fmt: skip
            merged = {f"transformer.{k}": v for k, v in dit.state_dict().items()}
            assert max_abs_diff(merged, {k: v for k, v in trained.items() if k.startswith("transformer.")}) < 1e-6
            lora_numel = sum(
                v.numel() for v in load_file(out / "transformer_lora" / "adapter_model.safetensors").values()
            )
            assert state_numel == 2 * lora_numel  # Adam's two moments of the adapters: no state for a frozen weight
            sizes[kind]["adapter MB"] = round(size_mb(out / "transformer_lora"), 3)
        else:
            assert not (out / "transformer_lora").exists()
            model = load_pipeline_model(str(source))
            assert state_numel == 2 * sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"sizes on disk: {sizes} (source {size_mb(source):.3f} MB)")


def test_accumulation_2x2_equals_4x1_and_a_curriculum_runs(source, tmp_path):
    a = stable_audio_quick_run(source, tmp_path / "2x2", max_steps=3, per_device_train_batch_size=2,
                               gradient_accumulation_steps=2, condition_dropout=0.5, learning_rate=1e-2)  # fmt: skip
    b = {**a, "output_dir": str(tmp_path / "4x1"), "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1}
    finetune(a)
    finetune(b)
    assert max_abs_diff(weights(tmp_path / "2x2"), weights(tmp_path / "4x1")) < 1e-6
    assert max_abs_diff(weights(tmp_path / "2x2"), weights(source)) > 1e-3
    assert read_metrics(tmp_path / "2x2")[-1]["train/null_condition"] > 0  # dropout drew the null condition
    paced = stable_audio_quick_run(source, tmp_path / "curriculum", max_steps=2, difficulty_method="acoustic",
                                   curriculum="linear", curriculum_steps=2)  # fmt: skip
    assert finetune(paced).global_step == 2


def test_under_bf16_the_frozen_parts_run_in_bf16_and_are_exported_unchanged(source, tmp_path, capsys):
    out = tmp_path / "bf16"
    finetune(stable_audio_quick_run(source, out, max_steps=2, mixed_precision="bf16", use_peft=True))
    assert "frozen T5 in bfloat16, VAE in bfloat16" in capsys.readouterr().out
    assert files(out) == files(source)  # cast for the run, never saved cast
    audio, _ = generate(out)
    assert audio.shape == (2, RATE) and torch.isfinite(audio).all()


def test_diffusion_dpo_with_the_v_objective_separates_chosen_from_rejected_and_exports_the_pipeline(source, tmp_path):
    """align from the pipeline alone (align_stable_audio.yaml's beta 2000): the chosen members' v error falls below the
    rejected ones' against the frozen reference, on the training pairs and the held-out ones; with the reference's
    terms precomputed it runs too."""
    settings = {
        "model_name_or_path": str(source), "report_to": "none", "synthetic_num_pairs": 18, "max_steps": 60,
        "eval_steps": 60, "eval_on_start": True, "save_steps": 1000, "logging_steps": 10,
        "per_device_train_batch_size": 8, "max_duration_seconds": 1.0, "learning_rate": 1e-3, "warmup_steps": 0,
    }  # fmt: skip
    out = tmp_path / "align"
    assert align({**settings, "output_dir": str(out)}).global_step == 60
    config = json.loads((out / "run_config.json").read_text())
    assert config["model_family"] == "stable_audio" and config["beta"] == 2000.0
    metrics = read_metrics(out)
    evals = [m for m in metrics if "eval/rewards/margins" in m]
    assert [m["step"] for m in evals] == [0, 60] and evals[0]["eval/rewards/margins"] == 0  # the policy starts as it
    assert evals[-1]["eval/rewards/margins"] > 0 and evals[-1]["eval/loss"] < 0.6931
    assert [m["train/loss"] for m in metrics if "train/loss" in m][-1] < 0.6931
    assert files(out) == files(source) and max_abs_diff(weights(out), weights(source)) > 0
    audio, _ = generate(out)
    assert audio.shape == (2, RATE)
    precomputed = {**settings, "output_dir": str(tmp_path / "precomputed"), "max_steps": 2, "eval_steps": 2}
    assert align({**precomputed, "precompute_ref_log_probs": True}).global_step == 2


def stereo_folder(folder: Path, channels: int = 2, rate: int = 48000, count: int = 6) -> Path:
    """A user's dataset: wav files (stereo at 48 kHz unless said) with a metadata.csv of descriptions."""
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
    the checkpoint picks the family and recipes/configs/finetune_stable_audio.yaml; stereo 48 kHz files are read as
    stereo at the VAE's 44.1 kHz; the folder that comes back is a StableAudioPipeline with its adapter beside it."""
    data = stereo_folder(tmp_path / "my_music")
    out = tmp_path / "recipe"
    flags = ["--model_name_or_path", str(source), "--dataset_name", str(data), "--use_peft", "true", "--max_steps", "2",
             "--eval_steps", "2", "--save_steps", "2", "--output_dir", str(out), "--report_to", "none"]  # fmt: skip
    done = launch(["--num_processes", "1", "recipes/finetune.py", *flags])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "the audio is mono" not in done.stdout
    config = json.loads((out / "run_config.json").read_text())
    expected = {"model_family": "stable_audio", "learning_rate": 5e-5, "adam_beta1": 0.9, "adam_beta2": 0.999,
                "weight_decay": 1e-3, "lr_scheduler_type": "inverse_sqrt", "lr_timescale": 1000000, "ema": True,
                "ema_decay": 0.9999, "ema_power": 0.75, "final_model": "ema", "condition_dropout": 0.1}  # fmt: skip
    assert {k: config[k] for k in expected} == expected
    assert (out / "transformer_lora" / "adapter_config.json").is_file() and (out / "ema" / "model_index.json").is_file()
    script = (
        "import sys, torch\n"
        "from diffusers import StableAudioPipeline\n"
        f"pipe = StableAudioPipeline.from_pretrained({str(out)!r})\n"
        "g = torch.Generator().manual_seed(0)\n"
        "audio = pipe('a melody', audio_end_in_s=1.0, num_inference_steps=4, generator=g).audios\n"
        "assert audio.shape == (1, 2, 44100) and torch.isfinite(audio).all(), audio.shape\n"
        "assert not any(m.startswith('hf_audio_trainer') for m in sys.modules)\n"
        "print('ok', pipe.vae.config.sampling_rate, type(pipe.scheduler).__name__)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd="/", capture_output=True, text=True, timeout=300,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-3:] == ["ok", "44100", "CosineDPMSolverMultistepScheduler"]


def pipeline_variant(source: Path, folder: Path, index: dict | None = None, scheduler: dict | None = None) -> Path:
    """A copy of the source pipeline with its model_index.json or scheduler config changed."""
    import shutil

    shutil.copytree(source, folder)
    if index is not None:
        (folder / "model_index.json").write_text(json.dumps({**json.loads((source / "model_index.json").read_text()),
                                                             **index}))  # fmt: skip
    if scheduler is not None:
        path = folder / "scheduler" / "scheduler_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **scheduler}))
    return folder


def test_bad_inputs_are_refused_before_training(source, tmp_path):
    def run(name, **overrides):
        return stable_audio_quick_run(overrides.pop("model_name_or_path", source), tmp_path / name, max_steps=2,
                                      **overrides)  # fmt: skip

    other = pipeline_variant(source, tmp_path / "audioldm", index={"_class_name": "AudioLDM2Pipeline"})
    with pytest.raises(ConfigError, match="is a AudioLDM2Pipeline.*which no model family trains; the toolkit trains"):
        finetune(run("a", model_name_or_path=other))
    with pytest.raises(ConfigError, match="is a AudioLDM2Pipeline; the stable_audio family fine-tunes a Stable"):
        finetune(run("a2", model_name_or_path=other, model_family="stable_audio"))
    with pytest.raises(ConfigError, match=r"--model_family flow, but .* is a StableAudioPipeline with a "
                       "CosineDPMSolverMultistepScheduler, which the stable_audio family trains"):  # fmt: skip
        finetune(run("b", model_family="flow"))
    epsilon = pipeline_variant(source, tmp_path / "epsilon", scheduler={"prediction_type": "epsilon"})
    with pytest.raises(ConfigError, match="predicts epsilon with sigma_data 1.0: the stable_audio family trains"):
        finetune(run("c", model_name_or_path=epsilon))
    # the VAE's channels and rate are the source's: no latent setting of the flow family is read
    with pytest.raises(ConfigError, match=r"--sample_rate: the stable_audio family does not read them; they are the "
                       "flow family's"):  # fmt: skip
        finetune(run("d", sample_rate=16000))
    with pytest.raises(
        ConfigError, match=r"quad/clip\d.wav \(train row \d\) has 4 channels and the model reads 2; downmix"
    ):
        finetune(
            run(
                "e",
                dataset_name=str(stereo_folder(tmp_path / "quad", channels=4, count=3)),
                preprocessing_cache_dir=str(tmp_path / "cache"),
            )
        )
    with pytest.raises(ConfigError, match=r"segment_seconds=3: the DiT generates at most 32 latent frames \(1.49 s\)"):
        finetune(run("f", segment_seconds=3.0))
    # a checkpoint with a weight missing is refused, never initialised anew
    broken = pipeline_variant(source, tmp_path / "broken")
    dit = broken / "transformer" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(dit)
    del tensors["proj_out.weight"]
    from safetensors.torch import save_file

    save_file(tensors, dit)
    with pytest.raises(
        ConfigError, match=r"does not fit a StableAudioDiTModel: 1 MISSING \(e.g. \['proj_out.weight'\]\)"
    ):
        finetune(run("g", model_name_or_path=broken))
    assert not any((tmp_path / name / "metrics.jsonl").exists() for name in "abcdefg")
    # a flow export still chooses the flow family, as before
    flow_export = tmp_path / "flow"
    pretrain(flow_quick_run(flow_export, max_steps=2))
    settings = flow_quick_run(tmp_path / "h", model_name_or_path=str(flow_export), max_steps=2, high_quality_only=False)
    del settings["model_family"]  # the checkpoint says
    assert finetune(settings).global_step == 2
    assert json.loads((tmp_path / "h" / "run_config.json").read_text())["model_family"] == "flow"
    assert ROOT.is_dir()
