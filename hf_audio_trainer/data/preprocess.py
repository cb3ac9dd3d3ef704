"""Preprocessing done once, for every run, stage and rank: audio -> codes on the accelerator, cached on disk.

Each rank encodes its own share of the rows (chunks c with c % world == rank) on `accelerator.device`, clips of
similar length batched together, and writes each chunk as an Arrow file (atomically: written beside, then renamed).
The folder is named by a fingerprint of what the codes depend on: the dataset's fingerprint, the codec's weights and
the settings. So a second run, another stage and every rank read the same codes (one process computed each row, so
ranks can never disagree over a near-tie), and a preprocessing run that was interrupted resumes at the first chunk
it had not written. The result is memory-mapped, so RAM does not grow with the dataset.

`datasets.map` cannot give this: it runs on one process, its cache key needs a picklable function (a codec on a
device is not: "Parameter 'function' ... couldn't be hashed", a random key, a new pass every run), and an
interrupted map starts over.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from datasets import Dataset
from datasets.arrow_writer import ArrowWriter
from tqdm.auto import tqdm

from hf_audio_trainer.codecs import AudioTokenizer
from hf_audio_trainer.codecs.base import tensor_bytes
from hf_audio_trainer.data.audio import decode_audio
from hf_audio_trainer.errors import ConfigError

CACHE_VERSION = 1  # bump when the cached columns change meaning
CHUNK_ROWS = 256  # rows per cache file: the unit of resumption and of the rank split
BATCH_SECONDS = 320.0  # padded audio per codec forward pass (clips of similar length share one)
PIECE_SECONDS = 300.0  # a longer track is encoded in pieces of this length, so memory is bounded by the piece
DONE = "done.json"
CODES_FEATURES = {
    "codes": datasets.List(datasets.List(datasets.Value("int16"))),
    "num_frames": datasets.Value("int32"),
}
# what an encoder makes, by the column it is stored in: discrete codes (int16) or continuous latents (float32)
VALUE_TYPES = {"codes": (np.int16, pa.int16(), "int16"), "latents": (np.float32, pa.float32(), "float32")}


def default_cache_dir() -> Path:
    """Where preprocessed datasets live unless --preprocessing_cache_dir says otherwise (beside datasets' cache)."""
    return Path(datasets.config.HF_DATASETS_CACHE) / "hf_audio_trainer"


def fingerprint(*parts) -> str:
    """A stable hash of plain values (strings, numbers, lists, dicts)."""
    return hashlib.sha256(json.dumps([CACHE_VERSION, *parts], sort_keys=True, default=str).encode()).hexdigest()[:24]


def cached_chunks(
    dataset: Dataset,
    encode_chunk: Callable[[int, int], tuple[pa.Table, float]],
    key: str,
    accelerator: Accelerator,
    cache_dir: str | os.PathLike | None,
    desc: str,
    chunk_rows: int = CHUNK_ROWS,
) -> Dataset:
    """`encode_chunk(start, stop)` (rows [start, stop) -> a table of new columns and the audio-seconds it read)
    over all rows, every rank its share, each chunk written once under `cache_dir/key`; returns the concatenated,
    memory-mapped result."""
    folder = Path(cache_dir or default_cache_dir()) / key
    num_chunks = -(-len(dataset) // chunk_rows)
    files = [folder / f"chunk-{c:06d}-of-{num_chunks:06d}.arrow" for c in range(num_chunks)]
    # the main process's view decides whether to compute, so every rank reaches the same barriers even while
    # another run finishes the same cache
    done = [(folder / DONE).is_file()]
    if accelerator.num_processes > 1:
        broadcast_object_list(done)
    if not done[0]:
        folder.mkdir(parents=True, exist_ok=True)
        rank, world = accelerator.process_index, accelerator.num_processes
        mine = [c for c in range(rank, num_chunks, world) if not files[c].is_file()]
        _write_chunks(mine, files, encode_chunk, chunk_rows, len(dataset), accelerator, desc)
        accelerator.wait_for_everyone()
    # Without a filesystem shared by all nodes, a rank sees only its own node's chunks: it computes the rest
    # (correct, if slower; a shared filesystem, or preprocessing on one node first, avoids the repeat).
    missing = [c for c in range(num_chunks) if not files[c].is_file()]
    if missing:
        print(f"{desc}: {len(missing)} chunk(s) that other processes wrote are not on this filesystem; computing them")
        folder.mkdir(parents=True, exist_ok=True)
        _write_chunks(missing, files, encode_chunk, chunk_rows, len(dataset), accelerator, desc)
    if not (folder / DONE).is_file():
        _atomic_write(folder / DONE, json.dumps({"rows": len(dataset), "chunks": num_chunks}).encode())
    parts = [Dataset.from_file(str(f)) for f in files]
    result = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    if len(result) != len(dataset):
        raise ConfigError(
            f"the preprocessing cache {folder} holds {len(result)} rows for a dataset of {len(dataset)}; delete that "
            "folder and run again"
        )
    return result


def _write_chunks(chunks, files, encode_chunk, chunk_rows, num_rows, accelerator, desc) -> None:
    bar = tqdm(total=len(chunks), desc=desc, unit="chunk", disable=not accelerator.is_local_main_process)
    started, seconds = time.perf_counter(), 0.0
    for c in chunks:
        table, audio_seconds = encode_chunk(c * chunk_rows, min((c + 1) * chunk_rows, num_rows))
        tmp = _temporary(files[c])
        with ArrowWriter(path=str(tmp), features=datasets.Features.from_arrow_schema(table.schema)) as writer:
            writer.write_table(table)
            writer.finalize()
        os.replace(tmp, files[c])  # a chunk file exists only when complete: an interrupted run redoes just this one
        seconds += audio_seconds
        hours_per_second = seconds / 3600 / max(time.perf_counter() - started, 1e-9)
        bar.set_postfix_str(f"{hours_per_second:.3g} audio-h/s")
        bar.update()
    bar.close()


def _temporary(path: Path) -> Path:
    """A name beside `path` that no other writer uses. Ranks on several nodes write the same cache folder, and their
    pids can be equal (containers number processes alike): the host and a random part make the name unique."""
    return path.with_name(f"{path.name}.tmp-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}")


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = _temporary(path)
    tmp.write_bytes(data)
    os.replace(tmp, path)  # atomic: a reader sees the old file or the whole new one, and the last writer wins


# --------------------------------------------------------------------------------------------------------------------
# Audio -> codes
# --------------------------------------------------------------------------------------------------------------------


class _Decoded(torch.utils.data.Dataset):
    """Audio values of one chunk decoded to mono waveforms, or [channels, samples] (in DataLoader workers when there
    are some)."""

    def __init__(
        self, values: list, start: int, sample_rate: int, max_samples: int | None, split: str,
        channels: int | None = None,
    ):  # fmt: skip
        self.values, self.start, self.sample_rate, self.max_samples = values, start, sample_rate, max_samples
        self.split, self.channels = split, channels

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, i: int) -> np.ndarray:
        where = f"{self.split} row {self.start + i}"
        wave = decode_audio(self.values[i], self.sample_rate, where=where, channels=self.channels)
        return wave[..., : self.max_samples] if self.max_samples is not None else wave


def _similar_length_batches(lengths: list[int], budget: int) -> Iterator[list[int]]:
    """Indices longest first, in batches whose padded size (count x longest) stays within `budget` samples."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    while order:
        size = max(1, budget // max(lengths[order[0]], 1))
        yield order[:size]
        order = order[size:]


def encode_waves(tokenizer: AudioTokenizer, waves: list[np.ndarray], dtype=np.int16) -> list[np.ndarray]:
    """Codes [codebooks, frames] (int16; latents [channels, frames] with `dtype` float32) of each wave: similar
    lengths batched, long tracks in pieces."""
    piece = int(PIECE_SECONDS * tokenizer.sample_rate) // tokenizer.hop_length * tokenizer.hop_length
    pieces, owner = [], []  # each wave as pieces of at most `piece` samples (whole frames, so codes line up)
    for i, w in enumerate(waves):  # a wave is [samples], or [channels, samples] for a multichannel encoder
        for start in range(0, max(w.shape[-1], 1), piece):
            pieces.append(w[..., start : start + piece])
            owner.append(i)
    codes: list = [None] * len(pieces)
    budget = int(BATCH_SECONDS * tokenizer.sample_rate)
    for batch in _similar_length_batches([p.shape[-1] for p in pieces], budget):
        for i, c in zip(batch, tokenizer.encode_batch([pieces[i] for i in batch]), strict=True):
            codes[i] = c.numpy().astype(dtype)
    joined: list[list[np.ndarray]] = [[] for _ in waves]
    for i, c in zip(owner, codes, strict=True):
        joined[i].append(c)
    return [np.concatenate(parts, axis=1) for parts in joined]


def _padded(wave: np.ndarray, length: int) -> np.ndarray:
    """`wave` ([samples] or [channels, samples]) with zeros after it up to `length` samples."""
    missing = length - wave.shape[-1]
    if missing <= 0:
        return wave
    return np.pad(wave, [(0, 0)] * (wave.ndim - 1) + [(0, missing)])


def nested_lists(arrays: list[np.ndarray], value_type: pa.DataType) -> pa.ListArray:
    """A list<list<value>> Arrow array of 2-D numpy arrays (rows of each), built without Python lists."""
    rows = np.asarray([a.shape[0] for a in arrays], dtype=np.int64)
    widths = [np.full(a.shape[0], a.shape[1], dtype=np.int64) for a in arrays]
    flat = np.concatenate([a.reshape(-1) for a in arrays]) if arrays else np.zeros(0)
    inner_offsets = np.concatenate([[0], *widths]).cumsum().astype(np.int32)
    inner = pa.ListArray.from_arrays(pa.array(inner_offsets), pa.array(flat, value_type))
    return pa.ListArray.from_arrays(pa.array(np.concatenate([[0], rows]).cumsum().astype(np.int32)), inner)


def module_fingerprint(module: torch.nn.Module) -> str:
    """A hash of a network's weights (what its outputs depend on)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode() + tensor_bytes(tensor))
    return digest.hexdigest()


def codes_table(
    codes: list[np.ndarray], extra: dict[str, list], features: datasets.Features, values: str = "codes",
    num_frames: list[int] | None = None,
) -> pa.Table:  # fmt: skip
    """`codes` ([codebooks][frames] int16; or `latents`, float32) and `num_frames` (theirs, unless given) built from
    numpy (no Python lists of numbers), with the `extra` columns; typed by `features`."""
    frames = np.asarray([c.shape[1] for c in codes] if num_frames is None else num_frames, dtype=np.int32)
    outer = nested_lists(codes, VALUE_TYPES[values][1])
    extra_features = datasets.Features({name: features[name] for name in extra})
    others = pa.Table.from_pydict(extra_features.encode_batch(extra), schema=extra_features.arrow_schema)
    columns = {values: outer, "num_frames": pa.array(frames)}
    if extra:
        columns.update({name: others.column(name) for name in extra})
    return pa.table(columns).cast(features.arrow_schema)


def _names(dataset: Dataset, audio_column: str, rows: list[int]) -> str:
    """'row 3 (clip_03.wav), row 9' for an error message."""
    names = []
    for row in rows:
        value = dataset[row][audio_column]
        path = value.get("path") if isinstance(value, dict) else value if isinstance(value, str) else None
        names.append(f"row {row}" + (f" ({os.path.basename(path)})" if path else ""))
    return ", ".join(names)


def encode_dataset(
    dataset: Dataset,
    tokenizer: AudioTokenizer,
    accelerator: Accelerator,
    audio_column: str = "audio",
    max_duration_seconds: float | None = None,
    num_workers: int | None = None,
    split: str = "train",
    keep: tuple[str, ...] = (),
    cache_dir: str | os.PathLike | None = None,
    chunk_rows: int = CHUNK_ROWS,
    values: str = "codes",
    channels: int | None = None,
    pad_to_samples: int | None = None,
) -> Dataset:
    """Every clip's `codes` ([num_codebooks][frames], int16) and `num_frames`, with the `keep` columns (and
    difficulty, quality) beside them; computed on the accelerator across ranks, once (see the module docstring).
    `values="latents"`: a continuous encoder's `latents` ([channels][frames], float32) instead of codes.

    `channels`: the encoder reads [channels, samples] (a stereo VAE; `data.audio.decode_audio`'s rule). A clip
    shorter than `pad_to_samples` is encoded with silence after it up to that length (the window a model trains on,
    silence included), and `num_samples` records its own length."""
    kept = [c for c in dataset.column_names if c in ("difficulty", "quality", *keep)]
    kind = values
    max_samples = None if max_duration_seconds is None else int(max_duration_seconds * tokenizer.sample_rate)
    # a mono encoder's key is what it always was, so existing caches stay valid
    layout = [] if channels is None and pad_to_samples is None else [{"channels": channels, "pad": pad_to_samples}]
    key = fingerprint(
        values, split, dataset._fingerprint, tokenizer.fingerprint(), audio_column, max_samples, kept,
        PIECE_SECONDS, BATCH_SECONDS, chunk_rows, str(accelerator.device.type), *layout,
    )  # fmt: skip
    stored = {
        values: datasets.List(datasets.List(datasets.Value(VALUE_TYPES[values][2]))),
        "num_frames": CODES_FEATURES["num_frames"],
    }
    if pad_to_samples is not None:
        stored["num_samples"] = datasets.Value("int64")
    features = datasets.Features({**stored, **{c: dataset.features[c] for c in kept}})
    audio = dataset.select_columns([audio_column]).with_format("numpy")
    encoder = None

    def encode_chunk(start: int, stop: int) -> tuple[pa.Table, float]:
        nonlocal encoder
        encoder = encoder or tokenizer.encoder_on(accelerator.device)
        # one column-wise read per chunk, as numpy: row by row as Python lists costs more than the codec itself
        values = list(audio[start:stop][audio_column])
        rows = _Decoded(values, start, tokenizer.sample_rate, max_samples, split, channels)
        # its own generator: a DataLoader draws its base seed from torch's global RNG, and the model is initialised
        # from that RNG after preprocessing, so a cold cache would otherwise change the initial weights
        loader = torch.utils.data.DataLoader(
            rows, batch_size=None, num_workers=num_workers or 0, generator=torch.Generator().manual_seed(0)
        )
        waves = list(loader)
        lengths = [w.shape[-1] for w in waves]
        if pad_to_samples is not None:
            waves = [_padded(np.asarray(w, dtype=np.float32), pad_to_samples) for w in waves]
        with torch.no_grad():
            codes = encode_waves(encoder, waves, VALUE_TYPES[kind][0])
        own = [tokenizer.num_frames(n) for n in lengths] if pad_to_samples is not None else [c.shape[1] for c in codes]
        empty = [start + i for i, n in enumerate(own) if n == 0]
        if empty:
            raise ConfigError(
                f"{len(empty)} {split} clip(s) are shorter than one tokenizer frame ({tokenizer.hop_length} samples "
                f"at {tokenizer.sample_rate} Hz): {_names(dataset, audio_column, empty[:5])}; remove them from the "
                "dataset (e.g. dataset.filter on the duration)"
            )
        extra = dataset.select_columns(kept)[start:stop] if kept else {}
        if pad_to_samples is not None:  # the clip's own frames and length, not the silence after it
            extra = {"num_samples": lengths, **extra}
        return codes_table(codes, extra, features, kind, own), sum(lengths) / tokenizer.sample_rate

    return cached_chunks(dataset, encode_chunk, key, accelerator, cache_dir, f"Tokenizing {split}", chunk_rows)


def text_width(encoder: torch.nn.Module) -> int:
    """The width of a text encoder's states: T5's d_model, a transformers encoder's hidden_size, or an
    encoder-decoder config's encoder's (T5Gemma's)."""
    config = encoder.config
    for width in (getattr(config, "d_model", None), getattr(config, "hidden_size", None)):
        if width:
            return int(width)
    return int(config.encoder.hidden_size)


def encode_text_states(
    dataset: Dataset,
    encoder: torch.nn.Module,
    accelerator: Accelerator,
    ids_column: str,
    states_column: str,
    split: str = "train",
    cache_dir: str | os.PathLike | None = None,
    chunk_rows: int = CHUNK_ROWS,
    encode: Callable | None = None,
) -> Dataset:
    """`dataset` with a frozen text encoder's last hidden states of each row's token ids ([tokens][d_model],
    float32) beside it, computed on the accelerator across ranks, once (cached like the codes). `encode(encoder,
    ids, device)`: how the states are computed (default `data.text.encode_texts`: the ids padded to the longest);
    a family whose pipeline pads otherwise passes its own, named in the cache key."""
    from hf_audio_trainer.data.text import encode_texts

    own = [] if encode is None else [getattr(encode, "cache_name", getattr(encode, "__qualname__", repr(encode)))]
    key = fingerprint(
        "text_states", split, dataset._fingerprint, module_fingerprint(encoder), ids_column, chunk_rows, *own
    )
    ids = dataset.select_columns([ids_column])
    encode = encode or encode_texts

    def encode_chunk(start: int, stop: int) -> tuple[pa.Table, float]:
        states = encode(encoder, ids[start:stop][ids_column], accelerator.device)
        width = text_width(encoder)
        states = [s if len(s) else np.zeros((0, width), np.float32) for s in states]
        table = pa.table({states_column: nested_lists(states, pa.float32())})
        features = datasets.Features({states_column: datasets.List(datasets.List(datasets.Value("float32")))})
        return table.cast(features.arrow_schema), 0.0

    states = cached_chunks(dataset, encode_chunk, key, accelerator, cache_dir, f"Text states {split}", chunk_rows)
    return datasets.concatenate_datasets([dataset, states], axis=1)
