"""The ace_step family end to end on a tiny random AceStepPipeline in ACE-Step 1.5's diffusers layout (a Qwen3 text
encoder with a Qwen-shaped tokenizer built offline, the condition encoder, the DiT, a stereo AutoencoderOobleck at 25
latent frames/s, the pipeline's scheduler): the checkpoint alone chooses the family, lr 0 exports the source bit for
bit, the family's conditioning and sampler are the pipeline's, training on one clip moves the pipeline's own
generations towards it, LoRA keeps every frozen part byte for byte and its adapter loads with the pipeline's own
`load_lora_weights`, a resumed run equals a straight one, bad inputs are refused before training, and align
(Diffusion-DPO) scores pairs as fine-tuning scores clips, separates chosen from rejected, and exports the pipeline."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict
from safetensors.torch import load_file

from hf_audio_trainer import finetune
from hf_audio_trainer.errors import ConfigError
from hf_audio_trainer.trackers import read_metrics
from tests.helpers import launch
from tests.tiny_ace_step import ace_step_quick_run, tiny_ace_step

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

FROZEN = ("text_encoder", "tokenizer", "vae", "scheduler")
TRAINED = ("transformer", "condition_encoder")
RATE = 16000
PROMPT = "a melody played on a sine wave, clean"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return tiny_ace_step(tmp_path_factory.mktemp("ace_step") / "source")


def files(folder: Path, parts=FROZEN) -> dict[str, bytes]:
    """Every file of a pipeline's `parts` and its model_index.json, by path, as bytes."""
    found = {"model_index.json": (folder / "model_index.json").read_bytes()}
    for part in parts:
        found.update(
            {str(p.relative_to(folder)): p.read_bytes() for p in sorted((folder / part).rglob("*")) if p.is_file()}
        )
    return found


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """The trained parts of a pipeline folder (the DiT and the condition encoder)."""
    return {
        f"{part}.{k}": v
        for part in TRAINED
        for k, v in load_file(str(Path(folder) / part / "diffusion_pytorch_model.safetensors")).items()
    }


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def pipeline(folder):
    from diffusers import AceStepPipeline

    pipe = AceStepPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, seed: int = 0, **kwargs) -> torch.Tensor:
    settings = {"lyrics": "", "audio_duration": 1.0, "num_inference_steps": 8, "guidance_scale": 3.0, **kwargs}
    return pipe(PROMPT, generator=torch.Generator().manual_seed(seed), **settings).audios[0]


def test_lr_0_exports_the_source_bit_for_bit_and_generates_what_it_generates(source, tmp_path, capsys):
    out = tmp_path / "lr0"
    finetune(ace_step_quick_run(source, out, max_steps=2, learning_rate=0.0, save_steps=2, use_peft=False))
    config = json.loads((out / "run_config.json").read_text())
    assert config["model_family"] == "ace_step" and config["condition_dropout"] == 0.15  # the checkpoint chose
    said = capsys.readouterr().out
    assert "no 'lyrics' column: every clip trains with empty lyrics" in said
    theirs, ours = weights(source), weights(out)
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in theirs)
    assert files(out, (*FROZEN, "condition_encoder")) == files(source, (*FROZEN, "condition_encoder"))
    a, b = generate(pipeline(source)), generate(pipeline(out))
    assert a.shape[0] == 2 and torch.equal(a, b)
    print(f"lr 0: DiT and condition encoder equal bit for bit; generation max |diff| {(a - b).abs().max().item()}")


def test_the_conditioning_and_the_sampler_are_the_pipelines(source):
    """The caption states and lyric embeddings as preprocessing computes them (the pipeline's prompt templates with
    the clip's duration, `encode_texts` on a padded batch) are `encode_prompt`'s; from the same noise the family's
    sampler (through the model the loop trains) gives the pipeline's latents, with and without APG guidance."""
    from hf_audio_trainer.data.text import encode_texts
    from hf_audio_trainer.families.ace_step import (
        AceStepModel,
        LyricEmbeddings,
        condition_batch,
        prompt_ids,
        sample_latents,
    )

    pipe = pipeline(source)
    prompts, lyrics, seconds = [PROMPT, "an arpeggio"], ["[verse]\nla la la, sing along", ""], 1.2
    text_ids, lyric_ids = prompt_ids(pipe.tokenizer, prompts, lyrics, [seconds] * 2, "en")
    assert len(text_ids[0]) != len(text_ids[1])  # the batch pads: what is cached must not depend on it
    text = encode_texts(pipe.text_encoder, text_ids, "cpu")
    lyric = encode_texts(LyricEmbeddings(pipe.text_encoder), lyric_ids, "cpu")
    model = AceStepModel(pipe.transformer, pipe.condition_encoder, pipe.latents_per_second).eval()
    frames = math.ceil(seconds * pipe.latents_per_second)
    errors = {}
    for i in range(2):
        with torch.no_grad():
            ts, _, ls, _ = pipe.encode_prompt(prompts[i], lyrics[i], "cpu", audio_duration=seconds)
        assert np.abs(text[i] - ts[0].numpy()).max() < 1e-5 * np.abs(ts.numpy()).max()
        assert np.array_equal(lyric[i], ls[0].numpy())
        for guidance in (1.0, 4.0):
            noise = torch.randn(1, frames, 8, generator=torch.Generator().manual_seed(i))
            theirs = pipe(prompts[i], lyrics=lyrics[i], audio_duration=seconds, num_inference_steps=6,
                          guidance_scale=guidance, latents=noise.clone(), output_type="latent").audios  # fmt: skip
            ours = sample_latents(model, *condition_batch([(text[i], lyric[i])]), noise, guidance, 6, 3.0)
            errors[(i, guidance)] = ((ours.transpose(1, 2) - theirs).abs().max() / theirs.abs().max()).item()
    print(f"sampler vs pipeline, max |diff| / max |latent|: {errors}")
    assert max(errors.values()) < 1e-5


def one_clip_dataset(folder: Path) -> tuple[Path, np.ndarray]:
    """One stereo 1-s clip (a sine left, a square wave right) with one prompt: 8 training rows, 1 validation row."""
    t = np.arange(RATE) / RATE
    clip = np.stack([np.sin(2 * np.pi * 440 * t), 0.5 * np.sign(np.sin(2 * np.pi * 220 * t))]).astype(np.float32)
    rows = {"audio": [{"array": clip, "sampling_rate": RATE}] * 8, "description": [PROMPT] * 8}
    first = {k: v[:1] for k, v in rows.items()}
    DatasetDict({"train": Dataset.from_dict(rows), "validation": Dataset.from_dict(first)}).save_to_disk(str(folder))
    return folder, clip


def test_a_fine_tune_on_one_clip_generates_it_through_the_exported_pipeline(source, tmp_path):
    """Flow matching at time t is what the pipeline samples: after 150 full fine-tuning steps on one clip and prompt,
    the exported pipeline (its own schedule, APG guidance) generates, from new seeds, latents far closer to that
    clip's than the untrained one, and close to it against the clip's own power."""
    data, clip = one_clip_dataset(tmp_path / "one_clip")
    out = tmp_path / "fit"
    finetune(ace_step_quick_run(
        source, out, dataset_name=str(data), max_steps=150, learning_rate=5e-3, use_peft=False,
        per_device_train_batch_size=8, gradient_accumulation_steps=1, lr_scheduler_type="constant_with_warmup",
        warmup_steps=5, logging_steps=50,
    ))  # fmt: skip
    before, after = pipeline(source), pipeline(out)
    with torch.no_grad():
        target = before.vae.encode(torch.from_numpy(clip)[None]).latent_dist.mode()[0].T  # [T, C]
    distances = {}
    for name, pipe in (("untrained", before), ("fine-tuned", after)):
        for seed in (11, 12, 13):
            latents = generate(pipe, seed, output_type="latent")
            distances.setdefault(name, []).append(((latents[: len(target)] - target) ** 2).mean().item())
    means = {name: float(np.mean(v)) for name, v in distances.items()}
    print(f"one-clip mean squared latent distance over 3 seeds: {means} (target power {(target**2).mean():.3f})")
    assert means["fine-tuned"] < 0.05 * means["untrained"] and means["fine-tuned"] < 0.25 * (target**2).mean().item()
    assert max(distances["fine-tuned"]) < min(distances["untrained"])  # every seed, not the mean


def test_lora_keeps_every_frozen_part_and_its_adapter_loads_with_the_pipelines_loader(source, tmp_path):
    """A LoRA fine-tune: the DiT's adapter (and nothing of the condition encoder) trains; the frozen parts and the
    condition encoder are exported byte for byte; `load_lora_weights` of transformer_lora/ onto the source pipeline
    generates what the merged export generates."""
    out = tmp_path / "lora"
    finetune(ace_step_quick_run(source, out, max_steps=3, save_steps=3, learning_rate=1e-2, lora_dropout=0.0))
    assert files(out, (*FROZEN, "condition_encoder")) == files(source, (*FROZEN, "condition_encoder"))
    trained, original = weights(out), weights(source)
    assert trained.keys() == original.keys()
    moved = {k for k in trained if not torch.equal(trained[k], original[k])}
    assert moved and all(k.startswith("transformer.") and ".to_" in k for k in moved)
    adapter = load_file(str(out / "transformer_lora" / "pytorch_lora_weights.safetensors"))
    assert adapter and all(k.startswith("transformer.layers.") and ".lora_" in k for k in adapter)
    saved = load_file(str(out / "checkpoint-3" / "model.safetensors"))
    assert saved and all("lora_" in k for k in saved)  # the checkpoint holds what trains
    merged, loaded = pipeline(out), pipeline(source)
    loaded.load_lora_weights(str(out / "transformer_lora"))
    a, b, c = generate(merged), generate(loaded), generate(pipeline(source))
    diff, moved_by = (a - b).abs().max().item(), (a - c).abs().max().item()
    print(
        f"LoRA: merged export vs load_lora_weights on the source: max |diff| {diff:.2e} (vs the source {moved_by:.2e})"
    )
    assert diff < 1e-4 * a.abs().max() and moved_by > 100 * diff


def test_two_steps_resume_two_steps_equals_four(source, tmp_path):
    settings = dict(max_steps=4, save_steps=2, learning_rate=1e-2, condition_dropout=0.5, lora_dropout=0.0)
    finetune(ace_step_quick_run(source, tmp_path / "straight", **settings))
    checkpoint = tmp_path / "straight" / "checkpoint-2"
    resumed = tmp_path / "resumed"
    finetune(ace_step_quick_run(source, resumed, resume_from_checkpoint=str(checkpoint), **settings))
    straight = weights(tmp_path / "straight")
    assert max_abs_diff(weights(resumed), straight) < 1e-6 and max_abs_diff(straight, weights(source)) > 1e-4
    full = dict(settings, use_peft=False, train_condition_encoder=True)
    finetune(ace_step_quick_run(source, tmp_path / "full", **full))
    finetune(ace_step_quick_run(source, tmp_path / "full_resumed", resume_from_checkpoint=str(
        tmp_path / "full" / "checkpoint-2"), **full))  # fmt: skip
    full_weights = weights(tmp_path / "full")
    assert max_abs_diff(weights(tmp_path / "full_resumed"), full_weights) < 1e-6
    moved = {k for k, v in full_weights.items() if not torch.equal(v, weights(source)[k])}
    assert any(k.startswith("condition_encoder.") for k in moved)  # --train_condition_encoder trains it


def test_lyrics_are_read_from_their_column_and_condition_the_model(source, tmp_path):
    """The same clips and captions with and without a lyrics column: at lr 0 the validation loss (the same noise and
    times) differs only through the lyrics reaching the condition encoder."""
    folder, _ = one_clip_dataset(tmp_path / "one_clip")
    data = DatasetDict.load_from_disk(str(folder))
    sung = DatasetDict({k: v.add_column("lyrics", ["[verse]\nla la la"] * len(v)) for k, v in data.items()})
    sung.save_to_disk(str(tmp_path / "sung"))
    losses = {}
    for name, dataset in (("sung", tmp_path / "sung"), ("instrumental", folder)):
        out = tmp_path / name
        finetune(ace_step_quick_run(source, out, dataset_name=str(dataset), max_steps=2, use_peft=False,
                                    learning_rate=0.0, eval_steps=2, eval_on_start=True))  # fmt: skip
        losses[name] = [m["eval/loss"] for m in read_metrics(out) if "eval/loss" in m]
    assert losses["sung"][0] == losses["sung"][-1] and losses["instrumental"][0] == losses["instrumental"][-1]
    assert abs(losses["sung"][0] - losses["instrumental"][0]) > 1e-4 * losses["instrumental"][0]


def test_bad_inputs_are_refused_before_training(source, tmp_path):
    def run(name, **overrides):
        return ace_step_quick_run(overrides.pop("model_name_or_path", source), tmp_path / name, max_steps=2,
                                  **overrides)  # fmt: skip

    with pytest.raises(ConfigError, match="--lyrics_column words: the train split has no such column"):
        finetune(run("a", lyrics_column="words"))
    with pytest.raises(ConfigError, match="--train_condition_encoder with --use_peft: LoRA adapts the DiT only"):
        finetune(run("b", use_peft=True, train_condition_encoder=True))
    with pytest.raises(ConfigError, match="--train_text_encoder: ACE-Step's Qwen text encoder stays frozen"):
        finetune(run("c", train_text_encoder=True))
    with pytest.raises(ConfigError, match="--segment_seconds 0.5: the ace_step family trains each clip whole"):
        finetune(run("d", segment_seconds=0.5))
    with pytest.raises(ConfigError, match="shift=0.0: must be > 0"):
        finetune(run("e", shift=0.0))
    missing = tmp_path / "missing"
    import shutil

    shutil.copytree(source, missing)
    shutil.rmtree(missing / "condition_encoder")
    with pytest.raises(ConfigError, match="its pipeline has no condition_encoder; pass a whole one"):
        finetune(run("f", model_name_or_path=missing))
    assert not any((tmp_path / name / "metrics.jsonl").exists() for name in "abcdef")


def test_the_issues_command_fine_tunes_with_lora_from_the_recipe_defaults(source, tmp_path):
    """`accelerate launch recipes/finetune.py --model_name_or_path <AceStepPipeline> --dataset_name my_music/
    --use_peft`: the checkpoint picks the family and recipes/configs/finetune_ace_step.yaml; the folder that comes
    back is an AceStepPipeline with its adapter beside it."""
    import soundfile as sf

    data = tmp_path / "my_music"
    data.mkdir()
    rows = ["file_name,description,lyrics"]
    for i in range(6):
        t = np.arange(int(48000 * (0.6 + 0.1 * i))) / 48000
        sf.write(data / f"clip{i}.wav", np.stack([np.sin(2 * np.pi * (220 + 40 * i) * t)] * 2, axis=1) * 0.5, 48000)
        rows.append(f'clip{i}.wav,"a melody of {i + 2} notes","[verse] la la {i}"')
    (data / "metadata.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "recipe"
    flags = ["--model_name_or_path", str(source), "--dataset_name", str(data), "--use_peft", "true", "--max_steps", "2",
             "--eval_steps", "2", "--save_steps", "2", "--output_dir", str(out), "--report_to", "none"]  # fmt: skip
    done = launch(["--num_processes", "1", "recipes/finetune.py", *flags])
    assert done.returncode == 0, done.stderr[-3000:]
    config = json.loads((out / "run_config.json").read_text())
    expected = {"model_family": "ace_step", "learning_rate": 1e-4, "lora_r": 64, "lora_alpha": 128,
                "condition_dropout": 0.15, "timestep_mu": -0.4, "timestep_sigma": 1.0}  # fmt: skip
    assert {k: config[k] for k in expected} == expected
    assert (out / "transformer_lora" / "pytorch_lora_weights.safetensors").is_file()
    pipe = pipeline(out)
    audio = generate(pipe, num_inference_steps=2)
    assert audio.shape[0] == 2 and torch.isfinite(audio).all()


def test_a_row_sees_what_it_sees_alone_whatever_else_is_in_its_batch(source):
    """The DiT has no attention mask: rows of other caption, lyric or clip lengths must not change a row's velocity
    (the padding they bring would otherwise be attended to). Each row of a mixed batch equals the row alone."""
    from hf_audio_trainer.families.ace_step import LYRIC_STATES, AceStepCollator, AceStepModel
    from hf_audio_trainer.families.flow import FlowCollator
    from hf_audio_trainer.objectives import rectified_flow_unit

    pipe = pipeline(source)
    model = AceStepModel(pipe.transformer, pipe.condition_encoder, pipe.latents_per_second).eval()
    rng = np.random.default_rng(0)
    rows = [
        {"latents": rng.standard_normal((8, frames)).astype(np.float32), "text_states": rng.standard_normal((n, 32)),
         LYRIC_STATES: rng.standard_normal((m, 32)), "num_frames": frames, "row_id": i}
        for i, (frames, n, m) in enumerate([(25, 7, 5), (20, 7, 5), (25, 11, 5), (25, 7, 9), (25, 7, 5)])
    ]  # fmt: skip
    collate = AceStepCollator(FlowCollator(25.0, 256, fixed=True, times=lambda g: torch.rand(1, generator=g)))

    batch = collate(rows)
    # rows 0 and 4 share their lengths; so do 2 and 3 (11 + 1 + 5 = 7 + 1 + 9 packed tokens, none of them padding)
    assert sorted(group for group, _, _ in batch["groups"]) == [[0, 4], [1], [2, 3]]
    x_t, time, _ = rectified_flow_unit(batch["latents"], batch["noise"], batch["sigmas"])
    with torch.no_grad():
        together = model(x_t, time, batch["text_states"], batch["text_mask"], batch["lyric_states"],
                         batch["lyric_mask"], batch["keep"], groups=batch["groups"])  # fmt: skip
        for i, row in enumerate(rows):  # the row alone, unpadded, as the pipeline feeds one clip
            f, n, m = row["num_frames"], len(row["text_states"]), len(row[LYRIC_STATES])
            alone = model(x_t[i : i + 1, :, :f], time[i : i + 1], batch["text_states"][i : i + 1, :n],
                          batch["text_mask"][i : i + 1, :n], batch["lyric_states"][i : i + 1, :m],
                          batch["lyric_mask"][i : i + 1, :m], batch["keep"][i : i + 1])[0]  # fmt: skip
            assert (together[i, :, :f] - alone).abs().max() < 1e-5 * alone.abs().max()
            assert not together[i, :, f:].any()  # padded frames: no prediction (and no loss)
        ungrouped = model(x_t, time, batch["text_states"], batch["text_mask"], batch["lyric_states"],
                          batch["lyric_mask"], batch["keep"])  # fmt: skip
    assert (ungrouped[0] - together[0]).abs().max() > 1e-3  # what padding did before rows were grouped


def test_under_bf16_in_loop_samples_come_from_the_pipelines_sampler_and_frozen_parts_stay(source, tmp_path, capsys):
    """bf16 autocast with the Qwen encoder and the VAE cast to bf16 for the run (never saved cast); the evaluation's
    FAD pass generates clips with the family's sampler (APG against the null condition) and decodes them."""
    out = tmp_path / "bf16"
    settings = dict(max_steps=2, mixed_precision="bf16", eval_steps=2, fad_embedder="mel", synthetic_num_clips=48,
                    num_eval_samples=2, eval_sample_seconds=0.5, guidance_scale=3.0)  # fmt: skip
    finetune(ace_step_quick_run(source, out, **settings))
    assert "frozen Qwen text encoder in bfloat16, VAE in bfloat16" in capsys.readouterr().out
    assert files(out, (*FROZEN, "condition_encoder")) == files(source, (*FROZEN, "condition_encoder"))
    evals = [m for m in read_metrics(out) if "eval/fad" in m]
    assert evals and all(math.isfinite(m["eval/fad"]) and math.isfinite(m["eval/loss"]) for m in evals)
    audio = generate(pipeline(out), num_inference_steps=2)
    assert audio.shape[0] == 2 and torch.isfinite(audio).all()


def test_a_turbo_checkpoint_samples_without_guidance_as_the_pipeline_does_and_is_told(tmp_path, capsys):
    """A turbo (guidance-distilled) checkpoint: the pipeline ignores guidance_scale, and so does the family's sampler;
    fine-tuning one says in a line that the base objective does not keep its distillation."""
    from hf_audio_trainer.data.text import encode_texts
    from hf_audio_trainer.families.ace_step import (
        AceStepModel,
        LyricEmbeddings,
        condition_batch,
        prompt_ids,
        sample_latents,
    )

    turbo = tiny_ace_step(tmp_path / "turbo", turbo=True)
    pipe = pipeline(turbo)
    text_ids, lyric_ids = prompt_ids(pipe.tokenizer, [PROMPT], [""], [1.0], "en")
    states = [(encode_texts(pipe.text_encoder, text_ids, "cpu")[0],
               encode_texts(LyricEmbeddings(pipe.text_encoder), lyric_ids, "cpu")[0])]  # fmt: skip
    noise = torch.randn(1, 25, 8, generator=torch.Generator().manual_seed(0))
    theirs = pipe(PROMPT, audio_duration=1.0, num_inference_steps=4, guidance_scale=4.0, latents=noise.clone(),
                  output_type="latent").audios  # fmt: skip
    model = AceStepModel(pipe.transformer, pipe.condition_encoder, pipe.latents_per_second).eval()
    ours = sample_latents(model, *condition_batch(states), noise, 4.0, 4, 3.0)
    assert (ours.transpose(1, 2) - theirs).abs().max() < 1e-5 * theirs.abs().max()
    finetune(ace_step_quick_run(turbo, tmp_path / "out", max_steps=2))
    assert "is a turbo (guidance-distilled, 8-step) checkpoint" in capsys.readouterr().out


def pair_dataset(folder: Path, clip: np.ndarray, lyrics: bool = True, drop: str | None = None) -> Path:
    """TRL-format pairs saved with save_to_disk: `clip` chosen over a noisier copy of it, under PROMPT (and lyrics);
    `drop`: a column left out."""
    rng = np.random.default_rng(0)
    rows = {
        "prompt": [PROMPT] * 4,
        "chosen": [{"array": clip, "sampling_rate": RATE}] * 4,
        "rejected": [
            {"array": clip + 0.3 * rng.standard_normal(clip.shape).astype(np.float32), "sampling_rate": RATE}
            for _ in range(4)
        ],
        **({"lyrics": ["[verse]\nla la la"] * 4} if lyrics else {}),
    }
    rows = {k: v for k, v in rows.items() if k != drop}
    first = {k: v[:1] for k, v in rows.items()}
    DatasetDict({"train": Dataset.from_dict(rows), "validation": Dataset.from_dict(first)}).save_to_disk(str(folder))
    return folder


def tone_pairs(folder: Path, train: int = 32, validation: int = 8) -> Path:
    """Synthetic TRL-format pairs: a stereo 1-s tone (its own pitch, waveform and caption) chosen over the same tone
    with white noise added; `train` and `validation` pairs, each with its own tone."""
    rng = np.random.default_rng(0)
    t = np.arange(RATE) / RATE
    rows = []
    for i in range(train + validation):
        pitch, square = float(rng.uniform(150, 900)), i % 2 == 1
        wave = np.sin(2 * np.pi * pitch * t)
        clip = (0.5 * (np.sign(wave) if square else wave)).astype(np.float32)
        clip = np.stack([clip, np.roll(clip, int(rng.integers(0, 200)))])
        noisy = clip + 0.3 * rng.standard_normal(clip.shape).astype(np.float32)
        caption = f"a {'square' if square else 'sine'} wave at {pitch:.0f} Hz, clean"
        audio = {side: {"array": x, "sampling_rate": RATE} for side, x in (("chosen", clip), ("rejected", noisy))}
        rows.append({"prompt": caption, **audio})
    split = {"train": rows[:train], "validation": rows[train:]}
    DatasetDict({k: Dataset.from_list(v) for k, v in split.items()}).save_to_disk(str(folder))
    return folder


def test_diffusion_dpo_separates_chosen_from_rejected_and_exports_the_pipeline(source, tmp_path):
    """align from the pipeline alone (align_ace_step.yaml's beta 2000) on synthetic pairs (a clean tone chosen over
    a noisy copy): the chosen members' flow error falls below the rejected ones' against the frozen reference, on the
    training pairs and the 8 held-out ones; the export is the source's AceStepPipeline (its frozen parts and condition
    encoder byte for byte, the DiT moved), which generates; with the reference's terms precomputed it runs too."""
    from hf_audio_trainer import align

    settings = {
        "model_name_or_path": str(source), "report_to": "none", "dataset_name": str(tone_pairs(tmp_path / "pairs")),
        "max_steps": 60,
        "eval_steps": 60, "eval_on_start": True, "save_steps": 1000, "logging_steps": 10,
        "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1, "max_duration_seconds": 1.0,
        "learning_rate": 3e-5, "warmup_steps": 0,
    }  # fmt: skip
    out = tmp_path / "align"
    assert align({**settings, "output_dir": str(out)}).global_step == 60
    config = json.loads((out / "run_config.json").read_text())
    assert config["model_family"] == "ace_step" and config["beta"] == 2000.0
    metrics = read_metrics(out)
    evals = [m for m in metrics if "eval/rewards/margins" in m]
    assert [m["step"] for m in evals] == [0, 60] and evals[0]["eval/rewards/margins"] == 0  # the policy starts as it
    trained = [m for m in metrics if "train/loss" in m]
    print(f"DPO held-out margin {evals[0]['eval/rewards/margins']} -> {evals[-1]['eval/rewards/margins']:.3f}, "
          f"accuracy {evals[0]['eval/rewards/accuracies']} -> {evals[-1]['eval/rewards/accuracies']}, loss "
          f"{evals[0]['eval/loss']:.4f} -> {evals[-1]['eval/loss']:.4f}; train loss {trained[0]['train/loss']:.4f} "
          f"-> {trained[-1]['train/loss']:.4f}, accuracy -> {trained[-1]['train/rewards/accuracies']}")  # fmt: skip
    assert evals[-1]["eval/rewards/margins"] > 0 and evals[-1]["eval/rewards/accuracies"] > 0.5
    assert evals[-1]["eval/loss"] < 0.6931 and trained[-1]["train/loss"] < 0.6931
    assert trained[-1]["train/rewards/accuracies"] > 0.5
    assert files(out, (*FROZEN, "condition_encoder")) == files(source, (*FROZEN, "condition_encoder"))
    assert max_abs_diff(weights(out), weights(source)) > 0
    audio, before = generate(pipeline(out), num_inference_steps=2), generate(pipeline(source), num_inference_steps=2)
    assert audio.shape == before.shape and audio.shape[0] == 2 and torch.isfinite(audio).all()
    assert not torch.equal(audio, before)
    precomputed = {**settings, "output_dir": str(tmp_path / "precomputed"), "max_steps": 2, "eval_steps": 2}
    assert align({**precomputed, "precompute_ref_log_probs": True}).global_step == 2


def test_a_pairs_chosen_clip_is_scored_as_fine_tuning_scores_it(source, tmp_path):
    """The pairs' conditioning is fine-tuning's: one clip with its caption and lyrics as fine-tuning's validation row
    and as a pair's chosen member (its prompt formatted with its duration, the lyrics from --lyrics_column), at lr 0:
    align's held-out `logps/chosen` (-1/2 the mean flow error at the row's fixed noise and time) is -1/2 the
    fine-tune's `eval/loss` on that row; without the lyrics it is not."""
    from hf_audio_trainer import align

    folder, clip = one_clip_dataset(tmp_path / "one_clip")
    data = DatasetDict.load_from_disk(str(folder))
    sung = DatasetDict({k: v.add_column("lyrics", ["[verse]\nla la la"] * len(v)) for k, v in data.items()})
    sung.save_to_disk(str(tmp_path / "sung"))
    run = {"report_to": "none", "max_steps": 1, "eval_steps": 1, "eval_on_start": True, "learning_rate": 0.0,
           "warmup_steps": 0, "seed": 7, "max_duration_seconds": 1.0}  # fmt: skip
    finetune(ace_step_quick_run(source, tmp_path / "ft", dataset_name=str(tmp_path / "sung"), use_peft=False, **run))
    loss = [m["eval/loss"] for m in read_metrics(tmp_path / "ft") if "eval/loss" in m][0]
    logps = {}
    for lyrics in (True, False):
        pairs = pair_dataset(tmp_path / f"pairs_{lyrics}", clip, lyrics=lyrics)
        out = tmp_path / f"align_{lyrics}"
        align({**run, "model_name_or_path": str(source), "dataset_name": str(pairs), "output_dir": str(out),
               "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1})  # fmt: skip
        logps[lyrics] = [m["eval/logps/chosen"] for m in read_metrics(out) if "eval/logps/chosen" in m][0]
    print(f"fine-tune eval/loss {loss:.6f}; align eval/logps/chosen with lyrics {logps[True]:.6f}, without "
          f"{logps[False]:.6f}")  # fmt: skip
    assert abs(logps[True] + 0.5 * loss) < 1e-5 * loss
    assert abs(logps[False] + 0.5 * loss) > 1e-4 * loss


def test_the_issues_align_command_and_pairs_lacking_a_column_are_refused_by_name(source, tmp_path):
    """`accelerate launch recipes/align.py --model_name_or_path <an AceStepPipeline> --dataset_name my_pairs/`: the
    checkpoint picks the family and align_ace_step.yaml, and an AceStepPipeline comes back; pairs without `rejected`
    or `prompt`, or without the --lyrics_column named, are refused by name before training."""
    from hf_audio_trainer import align

    _, clip = one_clip_dataset(tmp_path / "one_clip")
    base = {"model_name_or_path": str(source), "report_to": "none", "max_steps": 1, "max_duration_seconds": 1.0}
    for drop in ("rejected", "prompt"):
        pairs = pair_dataset(tmp_path / f"no_{drop}", clip, drop=drop)
        with pytest.raises(ConfigError, match=f"needs .*{drop}.* columns; found"):
            align({**base, "dataset_name": str(pairs), "output_dir": str(tmp_path / drop)})
    pairs = pair_dataset(tmp_path / "my_pairs", clip)
    with pytest.raises(ConfigError, match="--lyrics_column words: the train split has no such column"):
        align({**base, "dataset_name": str(pairs), "output_dir": str(tmp_path / "words"), "lyrics_column": "words"})
    assert not any((tmp_path / name / "metrics.jsonl").exists() for name in ("rejected", "prompt", "words"))
    out = tmp_path / "recipe"
    flags = ["--model_name_or_path", str(source), "--dataset_name", str(pairs), "--max_steps", "2", "--eval_steps",
             "2", "--save_steps", "2", "--max_duration_seconds", "1", "--output_dir", str(out),
             "--report_to", "none"]  # fmt: skip
    done = launch(["--num_processes", "1", "recipes/align.py", *flags])
    assert done.returncode == 0, done.stderr[-3000:]
    config = json.loads((out / "run_config.json").read_text())
    expected = {"model_family": "ace_step", "beta": 2000.0, "learning_rate": 1e-6, "gradient_accumulation_steps": 4}
    assert {k: config[k] for k in expected} == expected
    assert files(out, (*FROZEN, "condition_encoder")) == files(source, (*FROZEN, "condition_encoder"))
    audio = generate(pipeline(out), num_inference_steps=2)
    assert audio.shape[0] == 2 and torch.isfinite(audio).all()
