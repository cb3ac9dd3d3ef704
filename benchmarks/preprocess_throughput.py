"""Audio-seconds per second of the toolkit's preprocessing (`encode_dataset`) against the codec's own batched forward
over the same audio on the same device, and the time of a second run that finds the cache.

Data: synthetic clips (16 kHz, 0.5-3 s: the recipes' default data, and the harder case for batching, where whole
30-s tracks would all pad alike) generated into a memory-mapped Arrow file; each codec gets the first train rows
up to --mel_seconds / --encodec_seconds of audio.
  toolkit   `encode_dataset` into an empty cache folder, from reading the rows to the memory-mapped result: decode
            (resampled to 32 kHz for EnCodec), batch clips of similar length within each 256-row chunk, encode on
            `--device`, write Arrow.
  baseline  the same clips already decoded at the codec's rate and in memory, sorted by length over the whole set, in
            batches of BATCH_SECONDS of padded audio (the toolkit's budget), through the codec's batched forward
            only: `model.encode(padded, padding_mask)` for EnCodec, `encode_batch` for mel k-means (its own batched
            STFT + nearest-centroid search). Codes come back to the CPU in both.
  cached    `encode_dataset` again, same dataset and cache folder: it should only memory-map the chunks.
Targets: toolkit >= 0.8x the baseline; the cached run <= 5% of the first run. Best of --repeats for each.

Codecs: the mel k-means tokenizer (4 x 256, fitted on the clips) and EnCodec with the architecture of
facebook/encodec_32khz, the MusicGen codec (the values transformers' conversion script sets for it) and random
weights: the same compute without a download. EnCodec-32k runs a few audio-s/s on 2 CPU cores: keep its audio
small there.

    python benchmarks/preprocess_throughput.py [--mel_seconds 600] [--encodec_seconds 60] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from transformers import EncodecConfig, EncodecModel

from hf_audio_trainer.codecs import AudioTokenizer, EncodecTokenizer, MelKMeansTokenizer
from hf_audio_trainer.data.audio import decode_audio
from hf_audio_trainer.data.preprocess import BATCH_SECONDS, encode_dataset
from hf_audio_trainer.data.synthetic import make_synthetic_dataset

os.environ.setdefault("HF_HUB_OFFLINE", "1")
MEAN_CLIP_SECONDS = 1.75  # the synthetic clips are 0.5-3 s, uniform


def encodec_32khz() -> EncodecTokenizer:
    """facebook/encodec_32khz's architecture (59M parameters, 4 codebooks of 2048 at 50 Hz), random weights."""
    torch.manual_seed(0)
    # the rest are EncodecConfig's defaults, as in the 32 kHz checkpoint: hidden size 128, 2 LSTM layers, reflect pad
    config = EncodecConfig(
        sampling_rate=32000, audio_channels=1, num_filters=64, upsampling_ratios=[8, 5, 4, 4], target_bandwidths=[2.2],
        codebook_size=2048, normalize=False, chunk_length_s=None, use_causal_conv=False, use_conv_shortcut=False,
    )  # fmt: skip
    return EncodecTokenizer(EncodecModel(config))


def length_batches(waves: list[np.ndarray], budget: int) -> list[list[np.ndarray]]:
    """All waves longest first, in batches of at most `budget` padded samples (count x longest)."""
    order, batches = sorted(waves, key=len, reverse=True), []
    while order:
        size = max(1, budget // len(order[0]))
        batches.append(order[:size])
        order = order[size:]
    return batches


def codec_forward(encoder: AudioTokenizer, batch: list[np.ndarray]) -> None:
    """The codec's own batched forward over one batch of waves, codes back on the CPU."""
    if not isinstance(encoder, EncodecTokenizer):
        encoder.encode_batch(batch)  # mel k-means: batched STFT + one nearest-centroid search, nothing else
        return
    device = next(encoder.model.parameters()).device
    padded = torch.nn.utils.rnn.pad_sequence([torch.from_numpy(w) for w in batch], batch_first=True)
    mask = torch.arange(padded.shape[1])[None] < torch.tensor([len(w) for w in batch])[:, None]
    with torch.no_grad():
        out = encoder.model.encode(padded[:, None].to(device), mask[:, None].to(device), bandwidth=encoder.bandwidth)
    out.audio_codes.cpu()


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    """Seconds `fn(*args, **kwargs)` took, and its result."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


def baseline_pass(encoder: AudioTokenizer, batches: list[list[np.ndarray]]) -> None:
    for batch in batches:
        codec_forward(encoder, batch)


def measure(name: str, tokenizer: AudioTokenizer, clips, accelerator: Accelerator, root: Path, repeats: int) -> dict:
    """Best-of-`repeats` seconds of the baseline, the toolkit's first run and its cached run, on `clips`."""
    waves = [decode_audio(row["audio"], tokenizer.sample_rate) for row in clips]
    audio_seconds = sum(len(w) for w in waves) / tokenizer.sample_rate
    encoder = tokenizer.encoder_on(accelerator.device)
    batches = length_batches(waves, int(BATCH_SECONDS * tokenizer.sample_rate))
    codec_forward(encoder, waves[:8])  # warm-up: thread pools, allocator, kernels
    baseline, first, cached = [], [], []
    for r in range(repeats):
        baseline.append(timed(baseline_pass, encoder, batches)[0])
        cache_dir = root / f"{name}-{r}"  # empty: the first run computes everything
        first.append(timed(encode_dataset, clips, tokenizer, accelerator, cache_dir=cache_dir)[0])
        seconds, result = timed(encode_dataset, clips, tokenizer, accelerator, cache_dir=cache_dir)
        cached.append(seconds)
        assert len(result) == len(clips) and min(result["num_frames"]) > 0
    return {
        "codec": name, "clips": len(clips), "audio_seconds": audio_seconds, "batches": len(batches),
        "baseline": min(baseline), "toolkit": min(first), "cached": min(cached),
    }  # fmt: skip


def first_rows(train, seconds: float):
    """The first train rows that hold at least `seconds` of audio."""
    durations = np.cumsum(train["duration"])
    return train.select(range(min(int(np.searchsorted(durations, seconds)) + 1, len(train))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mel_seconds", type=float, default=600.0, help="audio-seconds for mel k-means")
    parser.add_argument("--encodec_seconds", type=float, default=60.0, help="audio-seconds for EnCodec-32k (slow)")
    parser.add_argument("--codecs", default="mel_kmeans,encodec_32khz")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=None, help="also write the markdown table to this file")
    args = parser.parse_args()
    accelerator = Accelerator(cpu=args.device == "cpu")
    codecs = args.codecs.split(",")
    seconds = {"mel_kmeans": args.mel_seconds, "encodec_32khz": args.encodec_seconds}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        num_clips = int(max(seconds[c] for c in codecs) / MEAN_CLIP_SECONDS / 0.95 * 1.2) + 20
        train = make_synthetic_dataset(num_clips=num_clips, seed=0, cache_dir=root / "data")["train"]
        for name in codecs:
            clips = first_rows(train, seconds[name])
            if name == "mel_kmeans":
                waves = [decode_audio(row["audio"], 16000) for row in clips]
                tokenizer = MelKMeansTokenizer.fit(waves, sample_rate=16000, num_codebooks=4, codebook_size=256, seed=0)
            else:
                tokenizer = encodec_32khz()
            rows.append(measure(name, tokenizer, clips, accelerator, root, args.repeats))
    lines = [
        f"Preprocessing throughput on {accelerator.device} ({os.cpu_count()} CPUs, {torch.get_num_threads()} torch "
        f"threads), synthetic 0.5-3 s clips, best of {args.repeats}",
        "",
        "| codec | clips | audio (s) | baseline (audio-s/s) | toolkit (audio-s/s) | toolkit / baseline "
        "| first run (s) | cached run (s) | cached / first |",
        "|:---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['codec']} | {r['clips']} | {r['audio_seconds']:.0f} | {r['audio_seconds'] / r['baseline']:.0f} "
            f"| {r['audio_seconds'] / r['toolkit']:.0f} | {r['baseline'] / r['toolkit']:.2f}x | {r['toolkit']:.2f} "
            f"| {r['cached']:.3f} | {100 * r['cached'] / r['toolkit']:.1f}% |"
        )
    lines.append("")
    for r in rows:
        ratio, fraction = r["baseline"] / r["toolkit"], r["cached"] / r["toolkit"]
        lines.append(
            f"{r['codec']}: toolkit/baseline {ratio:.2f}x ({'meets' if ratio >= 0.8 else 'misses'} >= 0.8x), cached "
            f"run {100 * fraction:.1f}% of the first ({'meets' if fraction <= 0.05 else 'misses'} <= 5%)"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
