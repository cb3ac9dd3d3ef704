"""Listening to the model while it trains: sample clips at every evaluation, decode them, measure FAD against the
validation set (and, for a text-conditioned model, the CLAP score against their prompts), and keep a few as wav files
(and as audio in TensorBoard)."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from accelerate import Accelerator
from datasets import Dataset

from hf_audio_trainer.errors import check
from hf_audio_trainer.metrics.clap import ClapScorer
from hf_audio_trainer.metrics.embedders import EMBEDDERS, load_embedder
from hf_audio_trainer.metrics.fad import embedding_statistics, frechet_distance, reference_statistics
from hf_audio_trainer.trackers import log_audio

SAMPLES_DIR = "samples"


@dataclass
class SamplesConfig:
    """Clips sampled (or, for a codec, reconstructed) at every evaluation, and their FAD against the validation set."""

    fad_embedder: str | None = field(
        default=None,
        metadata={"help": "Sample clips at every evaluation and log FAD vs validation: crepe, mel, encodec, clap."},
    )
    fad_embedder_model: str | None = field(
        default=None, metadata={"help": "The embedder's weights: a folder or Hub id (encodec, clap); crepe: tiny/full."}
    )
    num_eval_samples: int = field(default=16, metadata={"help": "Clips sampled (over all processes) for FAD."})
    eval_sample_seconds: float = field(default=2.0, metadata={"help": "Length of each sampled clip."})

    def __post_init__(self) -> None:
        check(
            self.fad_embedder is None or self.fad_embedder in EMBEDDERS,
            f"fad_embedder={self.fad_embedder!r}: choose one of {sorted(EMBEDDERS)} or none",
        )
        check(self.num_eval_samples >= 2, f"num_eval_samples={self.num_eval_samples}: FAD needs at least 2")
        check(self.eval_sample_seconds > 0, f"eval_sample_seconds={self.eval_sample_seconds}: must be > 0")


def fad_cache_dir() -> Path:
    """Where reference statistics are cached: $HF_AUDIO_TRAINER_CACHE/fad, by default ~/.cache/hf_audio_trainer/fad."""
    root = os.environ.get("HF_AUDIO_TRAINER_CACHE") or Path.home() / ".cache" / "hf_audio_trainer"
    return Path(root) / "fad"


class SampleEvaluator:
    """`evaluator(model, step)` -> {"eval/fad", "eval/fad_num_samples"}, with clips saved under OUTPUT_DIR/samples.

    `generate(model, num_frames, num_samples)` is the model family's sampler: a list of mono waveforms (numpy, at the
    tokenizer's sample rate) of about `num_frames` code frames each.

    The reference is the validation set decoded by the same tokenizer as the samples, so FAD measures the language
    model, not the codec's artifacts; its statistics are computed once per (validation fingerprint, embedder) and
    cached. Everything here (building the embedder, which may draw initial weights; sampling, each process with its
    own seed, from the unconditional model) runs in a forked RNG, so training's random streams are untouched; the
    embeddings are gathered from all processes.
    """

    def __init__(
        self,
        accelerator: Accelerator,
        tokenizer,
        generate: Callable[[torch.nn.Module, int, int], list[np.ndarray]],
        val_set: Dataset,
        embedder: str,
        embedder_model: str | None = None,
        num_samples: int = 16,
        seconds: float = 2.0,
        output_dir: str | os.PathLike = ".",
        num_saved: int = 4,
        seed: int = 0,
        column: str = "codes",
    ):
        self.accelerator, self.tokenizer, self.generate = accelerator, tokenizer, generate
        with self.own_rng(seed):  # building a network (crepe) draws initial weights: not from training's stream
            self.embedder = load_embedder(embedder, embedder_model, device=str(accelerator.device))
        self.per_process = math.ceil(num_samples / accelerator.num_processes)
        self.num_frames = max(1, round(seconds * tokenizer.frame_rate))
        self.output_dir, self.num_saved, self.seed = Path(output_dir), num_saved, seed
        key = f"{val_set._fingerprint}|{self.embedder.name}|{tokenizer.sample_rate}|{type(tokenizer).__name__}"

        def reference_embeddings() -> np.ndarray:
            waves = [tokenizer.decode(torch.tensor(codes)).numpy() for codes in val_set[column]]
            return self.embedder.embed(waves, tokenizer.sample_rate)

        # the main process computes and caches, the others read the cache
        with accelerator.main_process_first(), self.own_rng(seed):
            self.reference = reference_statistics(key, reference_embeddings, fad_cache_dir())

    @contextlib.contextmanager
    def own_rng(self, seed: int) -> Iterator[None]:
        """A forked torch RNG seeded with `seed`: what happens inside leaves training's random streams as they were."""
        devices = [self.accelerator.device] if self.accelerator.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            yield

    def __call__(self, model: torch.nn.Module, step: int) -> dict[str, float]:
        acc = self.accelerator
        with self.own_rng(self.seed + 1_000_003 * step + acc.process_index):
            waves = self.generate(acc.unwrap_model(model), self.num_frames, self.per_process)
            local = torch.from_numpy(self.embedder.embed(waves, self.tokenizer.sample_rate)).to(acc.device)
        embeddings = acc.gather(local).double().cpu().numpy()
        mu, sigma = embedding_statistics(embeddings)
        if acc.is_main_process:
            self.save(waves[: self.num_saved], step)
        return {"eval/fad": frechet_distance(mu, sigma, *self.reference), "eval/fad_num_samples": len(embeddings)}

    def save(self, waves: list[np.ndarray], step: int) -> None:
        folder = self.output_dir / SAMPLES_DIR / f"step-{step}"
        folder.mkdir(parents=True, exist_ok=True)
        sr = self.tokenizer.sample_rate
        for i, wave in enumerate(waves):
            peak = float(np.abs(wave).max()) or 1.0
            sf.write(folder / f"sample-{i}.wav", (wave / max(peak, 1.0)).astype(np.float32), sr)
        log_audio(self.accelerator, "samples", waves, step, sr)


def prompted_sample_metrics(
    accelerator: Accelerator,
    settings: SamplesConfig,
    clap_model: str | None,
    prompts: list[str],
    generate: Callable[[torch.nn.Module, int, list[int]], list[np.ndarray]],
    tokenizer,
    val_set: Dataset,
    output_dir: str | os.PathLike,
    seed: int,
    column: str = "codes",
) -> Callable[[torch.nn.Module, int], dict[str, float]]:
    """`metrics(model, step)` for a text-conditioned model's `sample` pass: clips generated from the validation
    `prompts`, scored by FAD (`settings`: the samples section's --fad_embedder) and by the CLAP score against their
    prompts (`clap_model`); {} when neither is asked for.

    `generate(model, num_frames, rows)` gives one waveform per row (an index into `prompts`); each process generates
    from its own share of the prompts.
    """
    acc, lg = accelerator, settings
    mine = list(range(acc.process_index, len(prompts), acc.num_processes)) or list(range(len(prompts)))
    generated: dict[str, list] = {}  # the last samples and their prompts, for the CLAP score

    def generate_mine(model: torch.nn.Module, num_frames: int, n: int) -> list[np.ndarray]:
        rows = [mine[i % len(mine)] for i in range(n)]
        waves = generate(model, num_frames, rows)
        generated.update(texts=[prompts[r] for r in rows], waves=waves)
        return waves

    sampler = clap = None
    if lg.fad_embedder is not None:
        sampler = SampleEvaluator(
            acc, tokenizer, generate_mine, val_set, lg.fad_embedder, lg.fad_embedder_model, lg.num_eval_samples,
            lg.eval_sample_seconds, output_dir, seed=seed, column=column,
        )  # fmt: skip
    if clap_model is not None:
        with torch.random.fork_rng():  # loading draws no numbers from training's stream
            clap = ClapScorer(clap_model, acc.device)

    def clap_score(model: torch.nn.Module, step: int) -> float:
        if sampler is None:  # no FAD pass generated clips: generate them here, seeded by the step
            with torch.random.fork_rng():
                torch.manual_seed(seed + 1_000_003 * step + acc.process_index)
                frames = max(1, round(lg.eval_sample_seconds * tokenizer.frame_rate))
                generate_mine(acc.unwrap_model(model), frames, -(-lg.num_eval_samples // acc.num_processes))
        scores = clap(generated["waves"], tokenizer.sample_rate, generated["texts"])
        return acc.gather(torch.as_tensor(scores, device=acc.device)).float().mean().item()

    def metrics(model: torch.nn.Module, step: int) -> dict[str, float]:
        results = sampler(model, step) if sampler is not None else {}
        if clap is not None:
            results["eval/clap_score"] = clap_score(model, step)
        return results

    return metrics
