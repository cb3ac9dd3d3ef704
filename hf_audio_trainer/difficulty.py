"""Per-clip difficulty in [0, 1] for curriculum learning: from a column, from the signal, or from a model's loss.

``score_difficulty`` runs the per-clip work in ``Dataset.map`` (so a dataset with cache files is scored once), then
rescales over the whole dataset and adds a float32 ``difficulty`` column.

The "acoustic" score is a weighted sum (``ACOUSTIC_WEIGHTS``) of five features, each first replaced by its
percentile rank in the dataset so that units and scales do not matter:

- ``noisiness``: noise floor over peak level, in dB: the 10th percentile over 60 Hz - 8 kHz of the time-averaged power
  spectrum. Tones fill a few bins and noise all of them, so a low percentile tracks the noise, not the instrument.
- ``polyphony``: pitch classes sounding together: per 256 ms frame, spectral peaks in 60 Hz - 1 kHz (the fundamentals)
  folded into 12 pitch classes, counting those with at least a fifth of the strongest one's power; the 75th
  percentile over the sounding frames.
- ``onset_rate``: onsets per second: peaks of the positive spectral flux of a 64-band mel spectrogram in dB floored
  20 dB under the clip's maximum (so noise and soft tails make no onsets), above the larger of the local mean and the
  median plus a fifth of the flux range.
- ``loudness_range``: 95th - 5th percentile of the frame energy in dB. ``duration``: seconds.

They were tuned on the bundled synthetic data, whose generator labels difficulty 0.40 polyphony + 0.35 log noise +
0.25 note density (``data/synthetic.py``). Over its 2,000 default clips the default score has a Spearman correlation
of 0.92 with that label, and polyphony, noisiness and onset rate have 0.94, 0.86 and 0.98 with the generator's
polyphony, log noise level and notes per second. Noise weighs less than in the label because its estimate is the
least reliable (clipping, low-pass and bit-crushing change the audible noise, not the label). Loudness range (-0.43
with the label: sparse notes between silences) and duration (0.00) do not describe that label, so they are measured
but weigh 0 by default; turn them on with ``weights=``.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from datasets.fingerprint import Hasher

from hf_audio_trainer.codecs import mel_filters
from hf_audio_trainer.curriculum import PACING
from hf_audio_trainer.data.audio import decode_audio
from hf_audio_trainer.data.codes import one_thread_in_workers
from hf_audio_trainer.errors import ConfigError, check

# Bump when the features change: datasets' fingerprint of the map function sees neither these constants nor the code
# it calls, so cached features would otherwise outlive the code that made them.
ACOUSTIC_VERSION = 1
ACOUSTIC_WEIGHTS = {"noisiness": 0.3, "polyphony": 0.45, "onset_rate": 0.25, "loudness_range": 0.0, "duration": 0.0}
SAMPLE_RATE = 16000  # acoustic features are measured at this rate whatever the clips' own
FINE_FFT, FINE_HOP = 1024, 256  # 64 ms windows every 16 ms: onsets, noise floor, loudness
TONAL_FFT, TONAL_HOP = 4096, 1024  # 256 ms windows (3.9 Hz bins) resolve semitones down to ~C3 for the pitch classes
NOISE_BAND_HZ, PITCH_BAND_HZ = (60.0, 8000.0), (60.0, 1000.0)
ONSET_MELS, ONSET_FLOOR_DB = 64, 20.0
# A single note's overtones hold less than a fifth of its fundamental's power (sawtooth: 1/9 for the fifth above).
PITCH_SHARE = 0.2
PITCH_QUANTILE = 0.75  # of the per-frame counts: arpeggios build up and notes die away, so the mean undercounts
BATCH_SAMPLES = 2**19  # padded samples per batched STFT (~33 s at 16 kHz): bounds memory whatever the clip lengths
TOKENIZER_DIR = "tokenizer"  # where a run's output folder keeps its tokenizer (families/musicgen.py)


def score_difficulty(
    dataset: datasets.Dataset,
    method: str,
    *,
    audio_column: str = "audio",
    column: str = "difficulty",
    model_name_or_path: str | None = None,
    num_proc: int | None = None,
    batch_size: int = 32,
    weights: dict[str, float] | None = None,
    clip_scorer=None,
) -> datasets.Dataset:
    """The dataset with a float32 `difficulty` column in [0, 1] (0 = easiest) scored by `method`.

    `clip_scorer(model_name_or_path) -> (score(waves) -> per-clip losses, sample rate)` is the model family's, for
    `model_loss`.
    """
    if method not in DIFFICULTY_METHODS:
        raise ConfigError(f"unknown difficulty method {method!r}; choose one of {sorted(DIFFICULTY_METHODS)}")
    if weights is not None and method != "acoustic":
        raise ConfigError(f"weights only apply to the 'acoustic' difficulty method, not {method!r}")
    raw = DIFFICULTY_METHODS[method](
        dataset,
        audio_column=audio_column,
        column=column,
        model_name_or_path=model_name_or_path,
        num_proc=num_proc,
        batch_size=batch_size,
        weights=weights,
        clip_scorer=clip_scorer,
    )
    _check_finite(raw, f"{method} difficulty score")
    span = float(raw.max() - raw.min()) if len(raw) else 0.0
    if span == 0:
        warnings.warn(
            f"all {len(raw)} {method} difficulty scores are equal: the curriculum will act as a plain shuffle",
            stacklevel=2,
        )
        scores = np.zeros(len(raw), dtype=np.float32)
    else:
        scores = ((raw - raw.min()) / span).astype(np.float32)
    # Added before the old column goes: a table with no columns left would also have no rows to add one to.
    scored = dataset.add_column("__difficulty__", scores, feature=datasets.Value("float32"))
    if "difficulty" in dataset.column_names:
        scored = scored.remove_columns("difficulty")
    return scored.rename_column("__difficulty__", "difficulty")


def _check_finite(values: np.ndarray, what: str) -> None:
    bad = np.flatnonzero(~np.isfinite(values))
    if len(bad):
        raise ConfigError(
            f"{what} is NaN or infinite at {len(bad)} row(s), e.g. rows {bad[:5].tolist()}; "
            "re-encode or remove those clips (or fix those values)"
        )


def _audio_dataset(dataset: datasets.Dataset, audio_column: str) -> datasets.Dataset:
    """The dataset with its audio column left undecoded (datasets decodes Audio only through torchcodec)."""
    if audio_column not in dataset.column_names:
        raise ConfigError(f"no audio column {audio_column!r} in {dataset.column_names}; name it with --audio_column")
    feature = dataset.features[audio_column]
    if isinstance(feature, datasets.Audio) and feature.decode:
        return dataset.cast_column(audio_column, datasets.Audio(decode=False))
    return dataset


def _map_fingerprint(dataset: datasets.Dataset, *parts: object) -> str:
    """A map's fingerprint from its input's and `parts` (what datasets' own hash of the function would miss)."""
    return Hasher.hash([dataset._fingerprint, *parts])


def percentile_rank(values: np.ndarray) -> np.ndarray:
    """Each value's rank scaled to [0, 1] (ties share their mean rank), so only the order of the values matters."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    mean_rank = np.cumsum(counts) - counts + (counts - 1) / 2
    return mean_rank[inverse] / max(len(values) - 1, 1)


def _column_scores(dataset: datasets.Dataset, *, column: str, **_) -> np.ndarray:
    if column not in dataset.column_names:
        raise ConfigError(
            f"the dataset has no difficulty column {column!r} (columns: {dataset.column_names}); name an existing "
            "numeric column, or score the clips from their audio with --difficulty_method acoustic"
        )
    try:
        return np.asarray(dataset[column], dtype=np.float64)  # None (a missing value) becomes NaN
    except (TypeError, ValueError) as err:
        raise ConfigError(f"difficulty column {column!r} is not numeric ({dataset.features[column]})") from err


def _acoustic_scores(
    dataset: datasets.Dataset,
    *,
    audio_column: str,
    num_proc: int | None,
    batch_size: int,
    weights: dict[str, float] | None,
    **_,
) -> np.ndarray:
    weights = {**ACOUSTIC_WEIGHTS, **(weights or {})}
    unknown = sorted(set(weights) - set(ACOUSTIC_WEIGHTS))
    if unknown or not all(np.isfinite(w) for w in weights.values()) or not any(weights.values()):
        raise ConfigError(
            f"acoustic weights {weights}: need finite weights, not all zero, for features {list(ACOUSTIC_WEIGHTS)}"
            + (f" (unknown: {unknown})" if unknown else "")
        )
    table = acoustic_feature_table(dataset, audio_column=audio_column, num_proc=num_proc, batch_size=batch_size)
    score = np.zeros(len(dataset))
    for name, weight in weights.items():
        values = np.asarray(table[name], dtype=np.float64)
        _check_finite(values, f"acoustic feature {name}")
        score += weight * percentile_rank(values)
    return score


def acoustic_feature_table(
    dataset: datasets.Dataset, audio_column: str = "audio", num_proc: int | None = None, batch_size: int = 32
) -> datasets.Dataset:
    """The raw acoustic features of every clip, one column each; cached by datasets for datasets with cache files."""
    dataset = _audio_dataset(dataset, audio_column)
    return dataset.map(
        _acoustic_batch,
        batched=True,
        batch_size=batch_size,
        with_indices=True,
        input_columns=[audio_column],
        remove_columns=dataset.column_names,
        num_proc=num_proc,
        new_fingerprint=_map_fingerprint(dataset, "acoustic", ACOUSTIC_VERSION, audio_column),
        desc="Scoring difficulty (acoustic)",
    )


def _acoustic_batch(audio: list, indices: list[int]) -> dict[str, list[float]]:
    one_thread_in_workers()
    waves = [decode_audio(value, SAMPLE_RATE, where=f"row {i}") for value, i in zip(audio, indices, strict=True)]
    return {name: values.tolist() for name, values in acoustic_features(waves).items()}


def acoustic_features(waves: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Raw features (see the module docstring) of mono clips at SAMPLE_RATE, from batched STFTs."""
    out = {name: np.zeros(len(waves)) for name in ACOUSTIC_WEIGHTS}
    # Longest first, batched up to a sample budget: little padding, few ops, bounded memory.
    order = sorted(range(len(waves)), key=lambda i: -len(waves[i]))
    while order:
        size = max(1, BATCH_SAMPLES // max(len(waves[order[0]]), 1))
        rows, order = order[:size], order[size:]
        lengths = torch.tensor([len(waves[i]) for i in rows])
        x = torch.zeros(len(rows), max(int(lengths.max()), 1))
        for row, i in enumerate(rows):
            x[row, : len(waves[i])] = torch.from_numpy(np.asarray(waves[i], dtype=np.float32))
        for name, values in _batch_features(x, lengths).items():
            out[name][rows] = values.double().numpy()
    return out


def _power(x: torch.Tensor, n_fft: int, hop: int) -> torch.Tensor:
    spec = torch.stft(x, n_fft, hop, window=_window(n_fft), center=True, pad_mode="constant", return_complex=True)
    parts = torch.view_as_real(spec).square_()  # a complex abs() would pay for a sqrt per bin
    return parts[..., 0] + parts[..., 1]  # [batch, freq, frames]


@functools.cache
def _window(n_fft: int) -> torch.Tensor:
    return torch.hann_window(n_fft)


@functools.cache
def _mel_filters() -> torch.Tensor:
    return mel_filters(SAMPLE_RATE, FINE_FFT, ONSET_MELS, min_frequency=40.0)


def _masked_quantile(values: torch.Tensor, mask: torch.Tensor, q: float) -> torch.Tensor:
    """Quantile q of each row over its masked-in entries; 0 for a row with none."""
    return torch.nanquantile(torch.where(mask, values, torch.nan), q, dim=1).nan_to_num(0.0)


def _frames(lengths: torch.Tensor, hop: int, num_frames: int) -> torch.Tensor:
    """Which STFT frames (center=True) of each padded row overlap its clip: [batch, frames]."""
    return torch.arange(num_frames)[None, :] < (lengths // hop + 1)[:, None]


def _batch_features(x: torch.Tensor, lengths: torch.Tensor) -> dict[str, torch.Tensor]:
    fine = _power(x, FINE_FFT, FINE_HOP)
    valid = _frames(lengths, FINE_HOP, fine.shape[-1])
    freqs = torch.fft.rfftfreq(FINE_FFT, 1 / SAMPLE_RATE)

    # White noise of standard deviation s puts s^2 * sum(window^2) in every bin, so this is the noise power.
    band = (freqs >= NOISE_BAND_HZ[0]) & (freqs <= NOISE_BAND_HZ[1])
    average = (fine[:, band] * valid[:, None]).sum(-1) / valid.sum(-1, keepdim=True)
    noise_power = torch.quantile(average, 0.1, dim=1) / _window(FINE_FFT).square().sum()
    peak_power = x.abs().amax(1).square()
    noisiness = 10 * torch.log10(noise_power / peak_power.clamp_min(1e-20) + 1e-12)

    frame_db = 10 * torch.log10(fine.sum(1) + 1e-10)
    loudness_range = _masked_quantile(frame_db, valid, 0.95) - _masked_quantile(frame_db, valid, 0.05)

    mel_db = 10 * torch.log10(torch.einsum("bft,fm->bmt", fine, _mel_filters()) + 1e-10)
    # Not under the -100 dB that the log's epsilon gives digital silence, which would otherwise rise above the floor.
    floor = (mel_db.amax((1, 2), keepdim=True) - ONSET_FLOOR_DB).clamp_min(-100.0)
    # Two frames of silence in front, so a clip that starts with a note has an onset as strong as a later one.
    mel_db = torch.cat([floor.expand(-1, mel_db.shape[1], 2), torch.maximum(mel_db, floor)], -1)
    # Lag 2 (32 ms) catches attacks slower than one hop.
    flux = torch.relu(mel_db[..., 2:] - mel_db[..., :-2]).mean(1) * valid
    is_peak = flux == F.max_pool1d(flux[:, None], 7, 1, 3)[:, 0]
    local_mean = F.avg_pool1d(flux[:, None], 31, 1, 15, count_include_pad=False)[:, 0]
    median = _masked_quantile(flux, valid, 0.5)[:, None]
    threshold = torch.maximum(local_mean, median) + 0.2 * (flux.amax(1, keepdim=True) - median)
    onsets = (is_peak & (flux > threshold) & valid).sum(1)
    duration = lengths / SAMPLE_RATE
    onset_rate = onsets / duration.clamp_min(FINE_HOP / SAMPLE_RATE)

    tonal = _power(x, TONAL_FFT, TONAL_HOP)
    tonal_valid = _frames(lengths, TONAL_HOP, tonal.shape[-1])
    energy = tonal.sum(1)
    sounding = tonal_valid & (energy > 1e-3 * (energy * tonal_valid).amax(1, keepdim=True)) & (energy > 0)
    freqs = torch.fft.rfftfreq(TONAL_FFT, 1 / SAMPLE_RATE)
    band = (freqs >= PITCH_BAND_HZ[0]) & (freqs <= PITCH_BAND_HZ[1])
    power = tonal[:, band]
    is_peak = torch.zeros_like(power, dtype=torch.bool)
    is_peak[:, 1:-1] = (power[:, 1:-1] > power[:, :-2]) & (power[:, 1:-1] >= power[:, 2:])
    is_peak &= power > 1e-3 * power.amax(1, keepdim=True)  # peaks within 30 dB of the frame's strongest
    pitch_class = torch.round(12 * torch.log2(freqs[band] / 440)).long() % 12
    chroma = torch.einsum("bft,fc->btc", power * is_peak, F.one_hot(pitch_class, 12).float())
    classes = (chroma > PITCH_SHARE * chroma.amax(-1, keepdim=True)).sum(-1).float()
    polyphony = _masked_quantile(classes, sounding, PITCH_QUANTILE)

    return {
        "noisiness": noisiness,
        "polyphony": polyphony,
        "onset_rate": onset_rate,
        "loudness_range": loudness_range,
        "duration": duration,
    }


@torch.no_grad()
def _model_loss_scores(
    dataset: datasets.Dataset,
    *,
    audio_column: str,
    model_name_or_path: str | None,
    num_proc: int | None,
    batch_size: int,
    clip_scorer=None,
    **_,
) -> np.ndarray:
    if model_name_or_path is None:
        raise ConfigError(
            "difficulty method 'model_loss' needs model_name_or_path: the output folder of a run "
            f"(a saved model with its {TOKENIZER_DIR}/ folder)"
        )
    if clip_scorer is None:
        raise ConfigError("difficulty method 'model_loss': this model family cannot score clips by its loss")
    folder = Path(model_name_or_path)
    dataset = _audio_dataset(dataset, audio_column)
    score, sample_rate = clip_scorer(model_name_or_path)

    def losses(audio: list, indices: list[int]) -> dict[str, list[float]]:
        one_thread_in_workers()
        waves = [decode_audio(v, sample_rate, where=f"row {i}") for v, i in zip(audio, indices, strict=True)]
        return {"loss": score(waves).tolist()}

    # datasets would hash the model (all its weights) to fingerprint `losses`; the saved files identify it cheaply.
    inside = [*folder.iterdir(), *((folder / TOKENIZER_DIR).iterdir() if (folder / TOKENIZER_DIR).is_dir() else [])]
    files = sorted(p for p in inside if p.is_file())
    saved = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    table = dataset.map(
        losses,
        batched=True,
        batch_size=batch_size,
        with_indices=True,
        input_columns=[audio_column],
        remove_columns=dataset.column_names,
        num_proc=num_proc,
        new_fingerprint=_map_fingerprint(dataset, "model_loss", audio_column, saved),
        desc="Scoring difficulty (model loss)",
    )
    return np.asarray(table["loss"], dtype=np.float64)


# Method name -> function(dataset, **options) giving each clip's raw score (higher = harder) before rescaling.
DIFFICULTY_METHODS = {"column": _column_scores, "acoustic": _acoustic_scores, "model_loss": _model_loss_scores}


@dataclass
class CurriculumConfig:
    """Data order (curriculum learning) and which part of the data a stage trains on."""

    curriculum: str = field(
        default="none",
        metadata={"help": "Pacing: none (plain shuffle), linear, root, geometric, step, or anti (hardest first)."},
    )
    curriculum_start_fraction: float = field(
        default=0.2, metadata={"help": "Fraction of the data (easiest first) open at step 0."}
    )
    curriculum_steps: int = field(default=1000, metadata={"help": "Steps until all of the data is open."})
    difficulty_method: str | None = field(
        default=None,
        metadata={
            "help": "Score difficulty before training: column, acoustic or model_loss; unset: use the "
            "dataset's `difficulty` column."
        },
    )
    difficulty_column: str = field(default="difficulty", metadata={"help": "Column read by difficulty_method column."})
    difficulty_model: str | None = field(
        default=None, metadata={"help": "Reference run folder (model + tokenizer/) for difficulty_method model_loss."}
    )
    group_by_length: bool = field(default=False, metadata={"help": "Batch clips of similar length (less padding)."})
    curriculum_segments: bool = field(
        default=False,
        metadata={
            "help": "Sequence-length curriculum: --curriculum's pacing grows the training window (short windows "
            "first, the full --segment_seconds from --curriculum_steps on) instead of opening harder clips; the "
            "batch is measured in tokens (--max_tokens_per_batch)."
        },
    )
    high_quality_only: bool = field(
        default=False, metadata={"help": "Train only on rows whose `quality` column is 'clean'."}
    )
    max_difficulty: float | None = field(
        default=None, metadata={"help": "Train only on rows whose difficulty is at most this."}
    )

    def __post_init__(self) -> None:
        check(self.curriculum in PACING, f"curriculum={self.curriculum!r}: choose one of {sorted(PACING)}")
        check(
            0.0 < self.curriculum_start_fraction <= 1.0,
            f"curriculum_start_fraction={self.curriculum_start_fraction}: must be in (0, 1]",
        )
        check(self.curriculum_steps >= 1, f"curriculum_steps={self.curriculum_steps}: must be >= 1")
        check(
            self.difficulty_method is None or self.difficulty_method in DIFFICULTY_METHODS,
            f"difficulty_method={self.difficulty_method!r}: choose one of {sorted(DIFFICULTY_METHODS)} or none",
        )
        check(
            self.difficulty_method != "model_loss" or self.difficulty_model is not None,
            "difficulty_method=model_loss needs --difficulty_model (a run folder with the reference model)",
        )
        check(
            self.max_difficulty is None or 0.0 <= self.max_difficulty <= 1.0,
            f"max_difficulty={self.max_difficulty}: must be in [0, 1]",
        )
