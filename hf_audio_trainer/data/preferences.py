"""Preference pairs for alignment: degradations, a seeded synthetic preference set, and checks on real ones.

A preference row holds a ``prompt`` and two continuations of it, ``chosen`` (preferred) and ``rejected``. The
synthetic set cuts each clean clip of the synthetic music data into a prompt and its continuation; the clean
continuation is chosen and a degraded copy of it is rejected, so the preference is known by construction.

Every degradation keeps the input's length and peak level, so loudness or duration alone never gives the answer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import datasets
import numpy as np
import pyarrow as pa
import soxr
from datasets.table import InMemoryTable

from hf_audio_trainer.data.audio import _load, _undecoded, split_off_validation, split_train_and_validation
from hf_audio_trainer.data.synthetic import _float32_lists, make_clip
from hf_audio_trainer.errors import ConfigError, check

# Bump when the generated pairs change, so fingerprints (and map() caches keyed on them) change too.
PREFERENCES_VERSION = 1
SAMPLE_RATE = 16000
# Ranges drawn from at strength 1 (see degrade for how strength scales each).
NOISE_SNR_DB = (5.0, 10.0)
DETUNE_CENTS = (30.0, 80.0)
CLIP_FRACTION = (0.2, 0.4)
# The continuation after the prompt lasts this long (seconds); shorter ones say little about which is better.
CONTINUATION_SECONDS = (0.5, 2.0)
FADE_SECONDS = 0.005

AUDIO = {"array": datasets.List(datasets.Value("float32")), "sampling_rate": datasets.Value("int32")}
FEATURES = datasets.Features(
    {
        "prompt": AUDIO,
        "chosen": AUDIO,
        "rejected": AUDIO,
        "description": datasets.Value("string"),
        "degradation": datasets.Value("string"),
        "clip_id": datasets.Value("int32"),
    }
)


def _add_noise(audio: np.ndarray, sample_rate: int, rng: np.random.Generator, strength: float) -> np.ndarray:
    """White Gaussian noise at an SNR drawn from NOISE_SNR_DB, its amplitude multiplied by strength."""
    snr_db = rng.uniform(*NOISE_SNR_DB)
    # A silent input still gets (quiet) noise, so the pair differs.
    rms = max(float(np.sqrt(np.mean(np.square(audio, dtype=np.float64)))), 1e-4)
    noise = rng.standard_normal(len(audio), dtype=np.float32) * np.float32(strength * rms / 10 ** (snr_db / 20))
    return audio + noise


def _detune(audio: np.ndarray, sample_rate: int, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Shift the pitch up or down by DETUNE_CENTS times strength, by resampling and playing at the old rate."""
    cents = rng.uniform(*DETUNE_CENTS) * strength * rng.choice([-1, 1])
    factor = 2 ** (cents / 1200)
    # Read as if recorded at sample_rate * factor and written at sample_rate: factor > 1 is shorter and higher.
    shifted = soxr.resample(audio, sample_rate * factor, sample_rate)[: len(audio)]
    if len(shifted) < len(audio):
        # A sharpened clip ends early: fade out its last 5 ms instead of cutting to silence with a click.
        fade = min(len(shifted), int(FADE_SECONDS * sample_rate))
        shifted[len(shifted) - fade :] *= np.linspace(1, 0, fade, dtype=np.float32)
        shifted = np.pad(shifted, (0, len(audio) - len(shifted)))
    return shifted


def _hard_clip(audio: np.ndarray, sample_rate: int, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Clip at a fraction of the peak, CLIP_FRACTION raised to the power strength (the caller restores the peak)."""
    threshold = np.float32(rng.uniform(*CLIP_FRACTION) ** strength * np.abs(audio).max(initial=0.0))
    return np.clip(audio, -threshold, threshold)


DEGRADATIONS = {"noise": _add_noise, "detune": _detune, "clip": _hard_clip}


def degrade(
    audio: np.ndarray, sample_rate: int, kind: str, rng: np.random.Generator, strength: float = 1.0
) -> np.ndarray:
    """A degraded copy of mono ``audio``: float32, same length and same peak level (at most 1).

    ``kind`` is one of ``DEGRADATIONS``:

    - ``noise``: white noise at 5-10 dB SNR; strength multiplies its amplitude.
    - ``detune``: pitch shifted 30-80 cents up or down, times strength; a sharpened copy is shorter, so it ends in
      up to 5% silence after a 5 ms fade.
    - ``clip``: hard-clipped at 0.2-0.4 of the peak, raised to the power strength, then scaled back to the peak.
    """
    if kind not in DEGRADATIONS:
        raise ValueError(f"unknown degradation {kind!r}; choose one of {list(DEGRADATIONS)}")
    if not strength > 0:
        raise ValueError(f"strength must be > 0, got {strength}")
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim != 1:
        raise ValueError(f"degrade takes mono audio (a 1-D array), got shape {audio.shape}")
    if len(audio) == 0:
        return audio.copy()
    out = DEGRADATIONS[kind](audio, sample_rate, rng, strength)
    peak, out_peak = min(float(np.abs(audio).max()), 1.0), float(np.abs(out).max())
    # Keeping the peak means the model cannot tell the degraded copy by its level (and clipping needs the gain back).
    if peak > 0 and out_peak > 0:
        out = out * np.float32(peak / out_peak)
    return np.clip(out, -1, 1).astype(np.float32, copy=False)


def _audio_column(arrays: list[np.ndarray]) -> pa.StructArray:
    sample_rates = pa.array([SAMPLE_RATE] * len(arrays), pa.int32())
    return pa.StructArray.from_arrays([_float32_lists(arrays), sample_rates], names=["array", "sampling_rate"])


def _split(rows: list[dict], fingerprint: str, chunk: int = 512) -> datasets.Dataset:
    """An in-memory Dataset built from Arrow arrays (from_dict would walk every sample in Python)."""
    batches = []
    # Chunks keep each Arrow list's int32 offsets far below 2**31 samples.
    for start in range(0, len(rows), chunk):
        part = rows[start : start + chunk]
        columns = {name: _audio_column([r[name] for r in part]) for name in ("prompt", "chosen", "rejected")}
        for name in ("description", "degradation"):
            columns[name] = pa.array([r[name] for r in part], pa.string())
        columns["clip_id"] = pa.array([r["clip_id"] for r in part], pa.int32())
        batches.append(pa.RecordBatch.from_pydict(columns, schema=FEATURES.arrow_schema))
    table = pa.Table.from_batches(batches, schema=FEATURES.arrow_schema)
    info = datasets.DatasetInfo(features=FEATURES)
    return datasets.Dataset(InMemoryTable(table), info=info, fingerprint=fingerprint)


def _fingerprint(key: str, split: str) -> str:
    return hashlib.sha256(f"hf-audio-trainer-preferences-{key}-{split}".encode()).hexdigest()[:16]


def make_synthetic_preferences(
    num_pairs: int = 500, seed: int = 0, prompt_seconds: float = 1.0, validation_fraction: float = 0.1
) -> datasets.DatasetDict:
    """Seeded preference pairs (clean continuation chosen, degraded copy rejected) with train/validation splits.

    Clips come from the synthetic music generator, each lasting ``prompt_seconds`` plus CONTINUATION_SECONDS;
    clips of "degraded" quality are skipped (about a third), and each clean clip gives one pair, so the splits
    never share a source clip. Degradations cycle through ``DEGRADATIONS`` in clip order.
    """
    if num_pairs < 1:
        raise ValueError(f"num_pairs must be >= 1, got {num_pairs}")
    if not prompt_seconds > 0:
        raise ValueError(f"prompt_seconds must be > 0, got {prompt_seconds}")
    if not 0 <= validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    cut = round(prompt_seconds * SAMPLE_RATE)
    shortest, longest = (prompt_seconds + seconds for seconds in CONTINUATION_SECONDS)
    kinds = list(DEGRADATIONS)
    rows = []
    # Clip i depends only on (seed, i), so pair k is the same whatever num_pairs is.
    for index in range(10 * num_pairs + 100):
        clip = make_clip(index, SAMPLE_RATE, shortest, longest, seed)
        if clip.quality != "clean":
            continue
        kind = kinds[len(rows) % len(kinds)]
        # A stream of its own, apart from the one make_clip rendered the clip with.
        rng = np.random.default_rng([seed, index, 1])
        continuation = clip.array[cut:]
        rows.append(
            {
                "prompt": clip.array[:cut],
                "chosen": continuation,
                "rejected": degrade(continuation, SAMPLE_RATE, kind, rng),
                "description": clip.description,
                "degradation": kind,
                "clip_id": index,
            }
        )
        if len(rows) == num_pairs:
            break
    else:
        raise RuntimeError(f"only {len(rows)} of the first {index + 1} synthetic clips are clean")
    num_val = min(max(round(num_pairs * validation_fraction), 1 if validation_fraction else 0), num_pairs - 1)
    val_rows = set(np.random.default_rng(seed).permutation(num_pairs)[:num_val].tolist())
    key = f"{PREFERENCES_VERSION}-{num_pairs}-{seed}-{prompt_seconds}-{validation_fraction}"
    splits = {
        "train": [r for i, r in enumerate(rows) if i not in val_rows],
        "validation": [r for i, r in enumerate(rows) if i in val_rows],
    }
    return datasets.DatasetDict(
        {split: _split(split_rows, _fingerprint(key, split)) for split, split_rows in splits.items()}
    )


def check_preference_columns(dataset: datasets.Dataset | datasets.DatasetDict, require_prompt: bool = False) -> None:
    """Raise a ValueError naming the columns found when ``chosen``/``rejected`` (or ``prompt``) are missing.

    Pre-tokenized ``chosen_codes``/``rejected_codes`` (and ``prompt_codes``) columns count as present.
    """
    needed = ("prompt", "chosen", "rejected") if require_prompt else ("chosen", "rejected")
    splits = dataset.items() if isinstance(dataset, datasets.DatasetDict) else [(None, dataset)]
    for split, ds in splits:
        if any(name not in ds.column_names and f"{name}_codes" not in ds.column_names for name in needed):
            names = ", ".join(repr(n) for n in needed[:-1]) + f" and {needed[-1]!r}"
            where = f" (split {split!r})" if split else ""
            raise ConfigError(f"the preference dataset{where} needs {names} columns; found {ds.column_names}")


def _as_bytes(value) -> bytes:
    """One chosen/rejected value as bytes that are equal exactly when the values are: samples, codes or a file."""
    if isinstance(value, dict):
        if value.get("array") is None:  # an undecoded audio file
            return value.get("bytes") or str(value.get("path")).encode()
        value = value["array"]
    array = np.asarray(value)
    # Compare values, not storage: float64 audio equal to float32 audio, int16 codes equal to int64 ones.
    array = array.astype(np.float32 if array.dtype.kind == "f" else np.int64, copy=False)
    return str(array.shape).encode() + np.ascontiguousarray(array).tobytes()


def drop_identical_pairs(dataset: datasets.Dataset) -> tuple[datasets.Dataset, int]:
    """Remove rows whose chosen and rejected are identical (they carry no preference); returns (kept, dropped).

    Compares ``chosen_codes``/``rejected_codes`` when the dataset has them (identical codes give the model nothing
    to learn even if the audio differed), else ``chosen``/``rejected``: their samples, or for ``datasets.Audio``
    columns the encoded file bytes, so nothing is decoded.
    """
    if {"chosen_codes", "rejected_codes"} <= set(dataset.column_names):
        chosen, rejected = "chosen_codes", "rejected_codes"
    else:
        check_preference_columns(dataset)
        chosen, rejected = "chosen", "rejected"
    view = _undecoded(_undecoded(dataset.select_columns([chosen, rejected]), chosen), rejected)
    keep = [i for i, row in enumerate(view.with_format("numpy")) if _as_bytes(row[chosen]) != _as_bytes(row[rejected])]
    dropped = len(dataset) - len(keep)
    return (dataset.select(keep) if dropped else dataset), dropped


def load_preference_dataset(
    dataset_name: str, dataset_config_name: str | None = None, validation_split_percentage: float = 10.0, seed: int = 0
) -> datasets.DatasetDict:
    """Train and validation pairs from a save_to_disk folder or a Hub id (a validation split is made if missing)."""
    loaded = _load(dataset_name, dataset_config_name, "chosen")
    name = f"preference dataset {dataset_name}"
    train, validation = split_train_and_validation(loaded, name)
    check_preference_columns(train)
    if validation is None:
        train, validation = split_off_validation(train, validation_split_percentage, seed, name)
    columns = [c for c in ("prompt", "chosen", "rejected") if c in train.column_names]
    for column in columns:  # decoded with soundfile later, never through datasets' torchcodec
        train, validation = _undecoded(train, column), _undecoded(validation, column)
    return datasets.DatasetDict({"train": train, "validation": validation})


@dataclass
class PreferenceDataConfig:
    """Preference pairs: `chosen` / `rejected` audio (or `*_codes`), optionally a `prompt` to continue."""

    shapes_model: ClassVar[bool] = True  # the longest pair sets a new model's positions

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "A save_to_disk folder or Hub dataset id with chosen/rejected (and prompt) columns; "
                  "unset: the embedded synthetic pairs (clean vs degraded continuations)."},
    )  # fmt: skip
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    validation_split_percentage: float = field(
        default=10.0, metadata={"help": "Percent of pairs held out when the dataset has no validation split."}
    )
    synthetic_num_pairs: int = field(default=400, metadata={"help": "Pairs in the embedded synthetic dataset."})
    prompt_seconds: float = field(default=1.0, metadata={"help": "Prompt length of the synthetic pairs."})
    max_duration_seconds: float = field(default=10.0, metadata={"help": "Longer prompts+responses are cut."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenizing."})
    tokenizer: str | None = field(
        default=None, metadata={"help": "Audio tokenizer; unset: the policy's own (MODEL/tokenizer)."}
    )

    def __post_init__(self) -> None:
        check(
            0.0 < self.validation_split_percentage <= 50.0,
            f"validation_split_percentage={self.validation_split_percentage}: must be in (0, 50]",
        )
        check(self.synthetic_num_pairs >= 4, f"synthetic_num_pairs={self.synthetic_num_pairs}: must be >= 4")
        check(self.prompt_seconds >= 0, f"prompt_seconds={self.prompt_seconds}: must be >= 0")
        check(self.max_duration_seconds > 0, f"max_duration_seconds={self.max_duration_seconds}: must be > 0")


def preference_pairs(data_cfg, seed: int, text_prompts: bool = False) -> datasets.DatasetDict:
    """The pairs `align` trains on (`data_cfg`: the data section): --dataset_name's, or the synthetic ones, their
    columns checked. With `text_prompts` a pair needs a prompt, and a synthetic pair's is its clip's description."""
    d = data_cfg
    if d.dataset_name is None:
        pairs = make_synthetic_preferences(d.synthetic_num_pairs, seed, d.prompt_seconds)
        if text_prompts:
            pairs = pairs.remove_columns("prompt").rename_column("description", "prompt")
    else:
        pairs = load_preference_dataset(d.dataset_name, d.dataset_config_name, d.validation_split_percentage, seed)
    check_preference_columns(pairs, require_prompt=text_prompts)
    return pairs


def usable_pairs(split: datasets.Dataset, name: str, log: Callable[[str], None]) -> datasets.Dataset:
    """The `name` split without its identical pairs (`log` says how many went); a split left empty is an error."""
    kept, dropped = drop_identical_pairs(split)
    if dropped:
        log(f"skipped {dropped} {name} pair(s) whose chosen and rejected are identical")
    if len(kept) == 0:
        raise ConfigError(f"the {name} split has no usable preference pairs (all chosen == rejected, or empty)")
    return kept


def prompt_texts(split: datasets.Dataset, name: str) -> list[str]:
    """The `prompt` column of preference pairs as text (TRL's format); audio prompts are the musicgen family's."""
    values = split["prompt"]
    if values and not all(v is None or isinstance(v, str) for v in values):
        raise ConfigError(
            f"the {name} pairs' 'prompt' column holds {type(values[0]).__name__} values, not text: a "
            "text-conditioned family aligns on (text prompt, chosen audio, rejected audio); for audio prompts use "
            "--model_family musicgen"
        )
    return ["" if v is None else v.strip() for v in values]
