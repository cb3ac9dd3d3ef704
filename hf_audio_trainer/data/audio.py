"""Audio decoding (soundfile + soxr) and dataset loading that never needs torchcodec.

datasets 5.x decodes ``Audio`` features only through torchcodec, so every Audio column is kept undecoded
(``Audio(decode=False)``: ``{"bytes", "path"}`` dicts) and ``decode_audio`` turns values into arrays here.
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import datasets
import numpy as np
import soundfile as sf
import soxr

from hf_audio_trainer.data.synthetic import make_synthetic_dataset
from hf_audio_trainer.errors import ConfigError, MissingError, check

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")
METADATA_FILE = "metadata.csv"
REENCODE_FIX = "re-encode it or remove it from the dataset"
DEFAULT_SEGMENT_SECONDS = 30.0  # MusicGen's context


@dataclass
class DataConfig:
    """Where the audio comes from, how long its training windows are, and where what is computed from it is cached."""

    shapes_model: ClassVar[bool] = True  # the windows set a new model's positions: a resume must match

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "A folder of audio files (optional metadata.csv), a save_to_disk folder or a Hub dataset id; "
            "unset: the embedded synthetic music dataset."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    audio_column: str = field(default="audio", metadata={"help": "Column holding the audio."})
    validation_split_percentage: float = field(
        default=5.0, metadata={"help": "Percent of train held out when the dataset has no validation split."}
    )
    synthetic_num_clips: int = field(default=2000, metadata={"help": "Clips in the embedded synthetic dataset."})
    max_duration_seconds: float | None = field(
        default=None,
        metadata={"help": "Tracks are cut to this length before tokenizing; unset: whole tracks, trained in windows."},
    )
    segment_seconds: float | None = field(
        default=None,
        metadata={
            "help": "Training window: each draw of a track trains on a window this long, at a start drawn from "
            "(seed, epoch, row); validation uses each track's middle window. Unset: --max_duration_seconds if set, "
            f"else {DEFAULT_SEGMENT_SECONDS:g} s (MusicGen's context)."
        },
    )
    preprocessing_num_workers: int | None = field(
        default=None,
        metadata={"help": "DataLoader workers decoding audio for tokenizing (the codec runs on the device)."},
    )
    streaming: bool = field(
        default=False,
        metadata={
            "help": "Stream --dataset_name (a folder of parquet or webdataset .tar shards with a validation split, or "
            "a Hub id) instead of loading it: shards split across ranks, tokenized a batch at a time, exact resume."
        },
    )
    streaming_validation_rows: int = field(
        default=256, metadata={"help": "With --streaming: the first rows of the validation split evaluated on."}
    )
    streaming_max_member_mb: float = field(
        default=1024.0,
        metadata={
            "help": "With --streaming: a webdataset (.tar) member the run reads that is larger than this many MiB is "
            "refused, naming shard and member (a sample's data is held in memory while it is read)."
        },
    )
    preprocessing_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Where tokenized datasets are cached (keyed by data, codec and settings; reused by every run, "
            "stage and rank); unset: hf_audio_trainer/ in the datasets cache (HF_DATASETS_CACHE)."
        },
    )

    def __post_init__(self) -> None:
        check(
            0.0 < self.validation_split_percentage <= 50.0,
            f"validation_split_percentage={self.validation_split_percentage}: must be in (0, 50]",
        )
        check(self.synthetic_num_clips >= 2, f"synthetic_num_clips={self.synthetic_num_clips}: must be >= 2")
        check(
            not self.streaming or self.dataset_name not in (None, "synthetic"),
            "--streaming needs --dataset_name: a folder of parquet or webdataset .tar shards, or a Hub id",
        )
        check(self.streaming_validation_rows >= 1, "streaming_validation_rows must be >= 1")
        check(self.streaming_max_member_mb > 0, f"streaming_max_member_mb={self.streaming_max_member_mb}: must be > 0")
        for name in ("max_duration_seconds", "segment_seconds"):
            check(getattr(self, name) is None or getattr(self, name) > 0, f"{name}={getattr(self, name)}: must be > 0")
        check(bool(self.audio_column), "audio_column must be a column name")

    @property
    def window_seconds(self) -> float:
        """The training window's length in seconds (see `segment_seconds`)."""
        return self.segment_seconds or self.max_duration_seconds or DEFAULT_SEGMENT_SECONDS


class AudioDecodeError(ConfigError):
    """An audio value that cannot be turned into samples; the message names the file or row and the fix."""


def _to_mono(samples: np.ndarray, name: str) -> np.ndarray:
    """Average channels; a 2-D array may be [channels, samples] or [samples, channels] (channels is the short axis)."""
    if samples.ndim == 1:
        return samples
    if samples.ndim != 2:
        raise AudioDecodeError(f"audio {name} has shape {samples.shape}; expected 1-D or 2-D samples")
    channel_axis = 0 if samples.shape[0] <= samples.shape[1] else 1
    return samples.mean(axis=channel_axis, dtype=np.float32)


def _read(source: str | io.BytesIO, name: str) -> tuple[np.ndarray, int]:
    """Samples [frames, channels] and rate of an encoded file, or AudioDecodeError naming it."""
    try:
        samples, sample_rate = sf.read(source, dtype="float32", always_2d=True)
    except (RuntimeError, TypeError, ValueError, OSError, EOFError) as err:  # LibsndfileError is a RuntimeError
        raise AudioDecodeError(f"could not decode audio {name}: {err}; {REENCODE_FIX}") from err
    return samples, sample_rate


def decode_audio(
    value: dict | str | os.PathLike, target_sample_rate: int, where: str = "", channels: int | None = None
) -> np.ndarray:
    """Mono float32 samples at target_sample_rate from a decoded dict, a {"bytes", "path"} dict or a file path.

    ``where`` (e.g. "row 17") goes into error messages, next to the file name when there is one. ``channels`` (a
    stereo VAE's 2): samples [channels, samples] instead, each channel resampled; a mono clip is duplicated to every
    channel, a clip with as many channels kept as it is, and any other count refused (1 downmixes, as None does).
    """
    if channels is not None and channels != 1:
        return _decode_channels(value, target_sample_rate, where, channels)
    if isinstance(value, dict) and "array" in value:
        name = where or "array"
        if value.get("sampling_rate") is None:
            raise AudioDecodeError(f"audio {name} has an array but no sampling_rate")
        samples, sample_rate = np.asarray(value["array"], dtype=np.float32), int(value["sampling_rate"])
        samples = _to_mono(samples, name)
    else:
        samples, sample_rate, name = _read_value(value, where)
        samples = samples.mean(axis=1, dtype=np.float32) if samples.shape[1] > 1 else samples[:, 0]
    _check_samples(samples, sample_rate, name)
    if sample_rate != target_sample_rate and len(samples) > 0:
        samples = soxr.resample(samples, sample_rate, target_sample_rate)
    return np.ascontiguousarray(samples, dtype=np.float32)


def _read_value(value, where: str) -> tuple[np.ndarray, int, str]:
    """Samples [frames, channels], rate and name of a {"bytes", "path"} dict or a file path."""
    if isinstance(value, dict):
        path, data = value.get("path"), value.get("bytes")
    elif isinstance(value, (str, os.PathLike)):
        path, data = os.fspath(value), None
    else:
        raise AudioDecodeError(
            f"audio {where or 'value'} is a {type(value).__name__}; expected a path, a {{'bytes', 'path'}} dict "
            "or an {'array', 'sampling_rate'} dict"
        )
    name = " ".join(part for part in (str(path) if path else "", f"({where})" if where else "") if part)
    name = name or "<unnamed bytes>"
    if data is not None:
        # Bytes win over the path: save_to_disk embeds the bytes and keeps only the file's base name as path.
        samples, sample_rate = _read(io.BytesIO(data), name)
    elif path is None:
        raise AudioDecodeError(f"audio {name} has neither bytes nor a path; {REENCODE_FIX}")
    elif not os.path.isfile(path):
        raise AudioDecodeError(f"audio file {name} does not exist; fix the path or remove it from the dataset")
    else:
        samples, sample_rate = _read(path, name)
    return samples, sample_rate, name


def _check_samples(samples: np.ndarray, sample_rate: int, name: str) -> None:
    if sample_rate <= 0:
        raise AudioDecodeError(f"audio {name} has sampling rate {sample_rate}; {REENCODE_FIX}")
    if not np.isfinite(samples).all():
        raise AudioDecodeError(f"audio {name} contains NaN or infinite samples; {REENCODE_FIX}")


def _decode_channels(value, target_sample_rate: int, where: str, channels: int) -> np.ndarray:
    """decode_audio's [channels, samples]: the file's channels as they are, or a mono clip on every channel."""
    if isinstance(value, dict) and "array" in value:
        name = where or "array"
        if value.get("sampling_rate") is None:
            raise AudioDecodeError(f"audio {name} has an array but no sampling_rate")
        samples, sample_rate = np.asarray(value["array"], dtype=np.float32), int(value["sampling_rate"])
        if samples.ndim == 1:
            samples = samples[:, None]
        elif samples.ndim == 2 and samples.shape[0] <= samples.shape[1]:  # [channels, samples]: the short axis
            samples = samples.T
        elif samples.ndim != 2:
            raise AudioDecodeError(f"audio {name} has shape {samples.shape}; expected 1-D or 2-D samples")
    else:
        samples, sample_rate, name = _read_value(value, where)
    _check_samples(samples, sample_rate, name)
    found = samples.shape[1]
    if found not in (1, channels):
        raise AudioDecodeError(
            f"audio {name} has {found} channels and the model reads {channels}; downmix it to {channels} (or mono) "
            "first, e.g. `ffmpeg -i IN -ac 2 OUT`"
        )
    if sample_rate != target_sample_rate and len(samples) > 0:
        samples = soxr.resample(samples, sample_rate, target_sample_rate)  # [frames, channels]: each channel alike
    samples = np.repeat(samples, channels, axis=1) if found == 1 else samples
    return np.ascontiguousarray(samples.T, dtype=np.float32)


def channel_count(value: dict | str | os.PathLike, where: str = "") -> int:
    """How many channels an audio value holds: an array's short axis, or the file's header (nothing decoded)."""
    if isinstance(value, dict) and "array" in value:
        samples = np.asarray(value["array"])
        return 1 if samples.ndim == 1 else int(min(samples.shape))
    path, data = (value.get("path"), value.get("bytes")) if isinstance(value, dict) else (os.fspath(value), None)
    try:
        return int(sf.info(io.BytesIO(data) if data is not None else path).channels)
    except (RuntimeError, TypeError, ValueError, OSError, EOFError) as err:
        raise AudioDecodeError(f"could not read audio {path or where or 'bytes'}: {err}; {REENCODE_FIX}") from err


def _undecoded(ds: datasets.Dataset, audio_column: str) -> datasets.Dataset:
    """Cast an Audio column to Audio(decode=False) so reading rows never calls torchcodec."""
    feature = ds.features.get(audio_column)
    if isinstance(feature, datasets.Audio) and feature.decode:
        return ds.cast_column(audio_column, datasets.Audio(decode=False))
    return ds


def _read_metadata(path: Path):
    """metadata.csv as pandas reads it, except that a column of text keeps its cells as written: pandas reads an
    empty cell (or "NA", "None" ...) as a float NaN, which Arrow refuses among strings and a text family would read
    as the text "nan". A column of numbers keeps its numbers (an empty cell there stays missing)."""
    import pandas as pd  # a datasets dependency; only needed here

    table = pd.read_csv(path)
    written = pd.read_csv(path, dtype=str, keep_default_na=False)
    for column in table.columns:
        # an all-empty column holds no numbers either: it is text with nothing written in it
        numbers = pd.api.types.is_numeric_dtype(table[column]) and not table[column].isna().all()
        if column == "file_name" or not numbers:
            table[column] = written[column]
    return table


def _listed_files(names: list[str], metadata: Path) -> list[str]:
    """metadata.csv's file names as paths inside the dataset folder, refusing an empty name, a name outside the
    folder and a file listed twice (its two rows could land in train and validation)."""
    listed, first_row = [], {}
    for row, name in enumerate(names, start=1):
        if not name.strip():
            raise ConfigError(f"{metadata} row {row} has an empty file_name; fill it in or remove the row")
        path = posixpath.normpath(Path(name).as_posix())
        if Path(name).is_absolute() or path == ".." or path.startswith("../"):
            raise ConfigError(
                f"{metadata} row {row} lists {name}, outside the dataset folder {metadata.parent}; move the file into "
                "the folder and list it by its path there"
            )
        if path in first_row:
            raise ConfigError(
                f"{metadata} lists {path} twice (rows {first_row[path]} and {row}); keep one row per file"
            )
        first_row[path] = row
        listed.append(path)
    return listed


def _audio_folder(root: Path, audio_column: str) -> datasets.Dataset:
    """A folder of audio files (recursive, sorted) with an optional HF-style metadata.csv."""
    files = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.suffix.lower() in AUDIO_EXTENSIONS
        and p.is_file()
        # Hidden folders (.cache, .git) hold no data of the user's.
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not files:
        raise ConfigError(f"no audio files found in {root}; supported extensions are {', '.join(AUDIO_EXTENSIONS)}")
    columns: dict[str, list] = {}
    metadata = root / METADATA_FILE
    if metadata.is_file():
        table = _read_metadata(metadata)
        if "file_name" not in table.columns:
            raise ConfigError(f"{metadata} has no 'file_name' column (columns: {list(table.columns)}); add one")
        if audio_column in table.columns:
            raise ConfigError(f"{metadata} has a column named '{audio_column}'; rename it or pass --audio_column")
        listed = _listed_files(table["file_name"].tolist(), metadata)
        missing = [name for name in listed if not (root / name).is_file()]
        if missing:
            raise ConfigError(f"{metadata} lists files that do not exist: {missing[:5]}; fix or remove those rows")
        unlisted = sorted(set(files) - set(listed))
        if unlisted:
            raise ConfigError(
                f"audio files in {root} missing from {METADATA_FILE}: {unlisted[:5]}"
                f"{f' and {len(unlisted) - 5} more' if len(unlisted) > 5 else ''}; add rows for them or move them out"
            )
        files = listed
        columns = {c: table[c].tolist() for c in table.columns if c != "file_name"}
    paths = [{"bytes": None, "path": str((root / name).resolve())} for name in files]
    ds = datasets.Dataset.from_dict({audio_column: paths, **columns})
    # The rows hold paths, so their hash alone would miss a file edited in place: the caches keyed on this
    # fingerprint (tokenized codes) must see the files' sizes and modification times too.
    digest = hashlib.sha256(ds._fingerprint.encode())
    for name in files:
        stat = (root / name).stat()
        digest.update(f"{name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    if metadata.is_file():
        digest.update(metadata.read_bytes())
    ds._fingerprint = digest.hexdigest()[:16]
    # Casting the {"bytes", "path"} struct works on Arrow storage alone; Audio's encode_example would need torchcodec.
    return ds.cast_column(audio_column, datasets.Audio(decode=False))


def _looks_local(name: str) -> bool:
    # Hub ids are "name" or "owner/name", so more than one "/" (or a Windows separator) means a path.
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)


def _load(name: str, dataset_config_name: str | None, audio_column: str):
    path = Path(name).expanduser()
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return datasets.load_from_disk(str(path))
        return _audio_folder(path, audio_column)
    if path.exists():
        raise ConfigError(
            f"dataset path {name} is a file; pass a folder of audio files, a save_to_disk folder or a Hub id"
        )
    if _looks_local(name):
        raise MissingError(f"dataset path {name} does not exist")
    try:
        return datasets.load_dataset(name, dataset_config_name)
    except Exception as err:  # offline, unknown id, bad config...: all mean the same thing to the user
        raise ConfigError(
            f"dataset '{name}' is neither an existing local folder nor a loadable Hub dataset id ({err}); "
            "pass a folder of audio files, a save_to_disk folder, or a Hub id"
        ) from err


def split_train_and_validation(loaded, name: str) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """The train split and, if the dataset has one with rows, its validation (or test) split."""
    if not isinstance(loaded, datasets.DatasetDict):
        return loaded, None
    if "train" in loaded:
        train = loaded["train"]
    elif len(loaded) == 1:
        train = next(iter(loaded.values()))
    else:
        raise ConfigError(f"{name} has no 'train' split (splits: {list(loaded)})")
    return train, next((loaded[s] for s in ("validation", "test") if s in loaded and len(loaded[s]) > 0), None)


def split_off_validation(
    train: datasets.Dataset, percentage: float, seed: int, name: str
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Hold out `percentage` percent of the rows (at least one, leaving at least one) as a seeded validation split."""
    if len(train) < 2:
        raise ConfigError(f"{name} has {len(train)} row(s); at least 2 are needed to split off a validation set")
    num_val = min(max(1, round(len(train) * percentage / 100)), len(train) - 1)
    split = train.train_test_split(test_size=num_val, seed=seed)
    return split["train"], split["test"]


def load_audio_dataset(
    dataset_name: str | None,
    audio_column: str = "audio",
    validation_split_percentage: float = 5.0,
    seed: int = 0,
    dataset_config_name: str | None = None,
    synthetic_num_clips: int = 2000,
    cache_dir: str | os.PathLike | None = None,
) -> datasets.DatasetDict:
    """Train and validation splits from the synthetic set, a save_to_disk folder, an audio folder or a Hub id."""
    if not 0 < validation_split_percentage <= 50:
        raise ConfigError(f"validation_split_percentage={validation_split_percentage}: must be in (0, 50]")
    if dataset_name in (None, "synthetic"):
        name = "synthetic"
        loaded = make_synthetic_dataset(
            num_clips=synthetic_num_clips,
            validation_fraction=validation_split_percentage / 100,
            seed=seed,
            cache_dir=cache_dir,
        )
    else:
        name = dataset_name
        loaded = _load(dataset_name, dataset_config_name, audio_column)

    train, validation = split_train_and_validation(loaded, f"dataset {name}")
    if len(train) == 0:
        raise ConfigError(f"dataset {name} has no rows in its train split; pass a dataset with audio in it")
    if audio_column not in train.column_names:
        raise ConfigError(
            f"dataset {name} has no audio column '{audio_column}'; its columns are {train.column_names}; "
            "name the right one with --audio_column"
        )
    if validation is None:
        train, validation = split_off_validation(train, validation_split_percentage, seed, f"dataset {name}")
    return datasets.DatasetDict(
        {"train": _undecoded(train, audio_column), "validation": _undecoded(validation, audio_column)}
    )
