"""A seeded synthetic music dataset: notes, chords, melodies and arpeggios with known difficulty and quality.

Every clip is rendered from its own generator seeded by ``(seed, clip index)``, so clip ``i`` is the same whatever
``num_clips`` is. Synthesis is vectorised numpy over whole notes (no per-sample Python loops), so the default
2,000 clips take a few seconds on one CPU core.

``difficulty`` is a documented weighted sum of how the clip was made::

    difficulty = clip(0.40 * (polyphony - 1) / (MAX_POLYPHONY - 1)
                      + 0.35 * clip(log(noise_level / MIN_NOISE) / log(MAX_NOISE / MIN_NOISE), 0, 1)
                      + 0.25 * min(notes_per_second / MAX_NOTES_PER_SECOND, 1), 0, 1)

``noise_level`` is the standard deviation of the added white noise relative to the clean signal's peak; it enters
on a log (decibel) scale, as loudness is heard, and is 0 for clean clips. ``notes_per_second`` counts note onsets
(a chord strike counts once) per second of audio.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
from datasets.arrow_writer import ArrowWriter
from datasets.table import InMemoryTable

# Bump when the generator's output changes, so fingerprints (and any map() caches keyed on them) change too.
SYNTHETIC_VERSION = 1
SPLITS = ("train", "validation")
WRITE_CHUNK = 512  # clips generated and written at a time into the cache files
MAX_POLYPHONY = 4
MIN_NOISE = 0.003
MAX_NOISE = 0.25
MAX_NOTES_PER_SECOND = 5.0
DIFFICULTY_WEIGHTS = {"polyphony": 0.40, "noise": 0.35, "density": 0.25}
# Noise std (relative to the clean signal's peak) at or above which a clip counts as degraded.
DEGRADED_NOISE_LEVEL = 0.1

# Polyphonic kinds are drawn more often so difficulty (which weights polyphony most) spreads over [0, 1].
KIND_WEIGHTS = {"note": 0.15, "melody": 0.25, "chord": 0.3, "arpeggio": 0.3}
KINDS = tuple(KIND_WEIGHTS)
TIMBRE_PHRASES = {
    "sine": "a sine tone",
    "triangle": "a triangle wave",
    "saw": "a sawtooth synth",
    "square": "a square-wave synth",
    "pluck": "a plucked string",
}
TIMBRES = tuple(TIMBRE_PHRASES)
# Chord shapes as semitone offsets above the root, grouped by number of notes.
CHORDS = {
    2: {"power": (0, 7), "major third": (0, 4), "minor third": (0, 3)},
    3: {"major": (0, 4, 7), "minor": (0, 3, 7), "diminished": (0, 3, 6), "sus4": (0, 5, 7)},
    4: {"major 7th": (0, 4, 7, 11), "minor 7th": (0, 3, 7, 10), "dominant 7th": (0, 4, 7, 10)},
}
SCALES = {
    "major": (0, 2, 4, 5, 7, 9, 11),
    "minor": (0, 2, 3, 5, 7, 8, 10),
    "major pentatonic": (0, 2, 4, 7, 9),
    "minor pentatonic": (0, 3, 5, 7, 10),
}
DEGRADATIONS = ("clipped", "low-passed", "bit-crushed")
NOTE_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")

FEATURES = datasets.Features(
    {
        "audio": {"array": datasets.List(datasets.Value("float32")), "sampling_rate": datasets.Value("int32")},
        "clip_id": datasets.Value("int32"),
        "kind": datasets.Value("string"),
        "timbre": datasets.Value("string"),
        "bpm": datasets.Value("int32"),
        "duration": datasets.Value("float32"),
        "polyphony": datasets.Value("int32"),
        "noise_level": datasets.Value("float32"),
        "notes_per_second": datasets.Value("float32"),
        "frequencies": datasets.List(datasets.Value("float32")),
        "difficulty": datasets.Value("float32"),
        "quality": datasets.Value("string"),
        "description": datasets.Value("string"),
    }
)


@dataclass
class Clip:
    """One rendered clip and the parameters it was made from."""

    array: np.ndarray
    sample_rate: int
    kind: str
    timbre: str
    bpm: int
    polyphony: int
    noise_level: float
    notes_per_second: float
    difficulty: float
    quality: str
    description: str
    frequencies: list[float] = field(default_factory=list)

    @property
    def duration(self) -> float:
        """Length in seconds."""
        return len(self.array) / self.sample_rate


def midi_to_hz(midi: float) -> float:
    """Equal-tempered frequency of a MIDI note number (A4 = 69 = 440 Hz)."""
    return 440.0 * 2.0 ** ((midi - 69) / 12)


def note_name(midi: int) -> str:
    """Scientific pitch name of a MIDI note, e.g. 69 -> 'A4'."""
    return f"{NOTE_NAMES[midi % 12]}{midi // 12 - 1}"


def difficulty_score(polyphony: int, noise_level: float, notes_per_second: float) -> float:
    """The weighted difficulty in [0, 1] documented at the top of this module."""
    poly = (polyphony - 1) / (MAX_POLYPHONY - 1)
    noise = np.clip(np.log(max(noise_level, 1e-12) / MIN_NOISE) / np.log(MAX_NOISE / MIN_NOISE), 0.0, 1.0)
    density = min(notes_per_second / MAX_NOTES_PER_SECOND, 1.0)
    w = DIFFICULTY_WEIGHTS
    return float(np.clip(w["polyphony"] * poly + w["noise"] * noise + w["density"] * density, 0.0, 1.0))


def _polyblep(frac: np.ndarray, dt: float) -> np.ndarray:
    """Band-limiting correction around a unit step at phase 0, which removes most of a naive saw's aliasing."""
    out = np.zeros_like(frac)
    lo = frac < dt
    x = frac[lo] / dt
    out[lo] = 2 * x - x * x - 1
    hi = frac > 1 - dt
    x = (frac[hi] - 1) / dt
    out[hi] = x * x + 2 * x + 1
    return out


# Long smooth curves are built as an outer product of per-block and within-block values: exact, and a multiply or
# two per sample instead of a transcendental call (np.sin/np.exp cost ~4 ns a sample on the 2-core CPUs we target).
_BLOCK = 1024


def _exp_decay(n: int, rate: float) -> np.ndarray:
    """exp(-rate * i) for i in range(n), float32."""
    blocks = np.exp(-rate * _BLOCK * np.arange(-(-n // _BLOCK))).astype(np.float32)
    inner = np.exp(-rate * np.arange(_BLOCK)).astype(np.float32)
    return (blocks[:, None] * inner[None, :]).ravel()[:n]


def _sin_cos(n: int, dt: float, with_cos: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """sin (and cos) of 2 pi dt i for i in range(n), float32, by the angle-sum identities."""
    w = 2 * np.pi * dt
    blocks = w * _BLOCK * np.arange(-(-n // _BLOCK))
    inner = w * np.arange(_BLOCK)
    sb, cb = np.sin(blocks).astype(np.float32)[:, None], np.cos(blocks).astype(np.float32)[:, None]
    si, ci = np.sin(inner).astype(np.float32), np.cos(inner).astype(np.float32)
    sin = (sb * ci + cb * si).ravel()[:n]
    return sin, (cb * ci - sb * si).ravel()[:n] if with_cos else None


def _phase(index: np.ndarray, dt: float) -> np.ndarray:
    """Phase in cycles, wrapped to [0, 1); float32 relative to the note's onset stays within ~1e-4 of exact."""
    frac = index * np.float32(dt)
    frac -= np.floor(frac)
    return frac


def _sine(index: np.ndarray, dt: float, slow: np.ndarray | None) -> np.ndarray:
    return _sin_cos(len(index), dt, with_cos=False)[0]


def _triangle(index: np.ndarray, dt: float, slow: np.ndarray | None) -> np.ndarray:
    return 4 * np.abs(_phase(index, dt) - np.float32(0.5)) - 1


def _saw(index: np.ndarray, dt: float, slow: np.ndarray | None) -> np.ndarray:
    frac = _phase(index, dt)
    return 2 * frac - 1 - _polyblep(frac, dt)


def _square(index: np.ndarray, dt: float, slow: np.ndarray | None) -> np.ndarray:
    frac = _phase(index, dt)
    naive = np.where(frac < 0.5, np.float32(1), np.float32(-1))
    half = frac + np.float32(0.5)
    half -= np.floor(half)
    return naive + _polyblep(frac, dt) - _polyblep(half, dt)


def _pluck(index: np.ndarray, dt: float, slow: np.ndarray) -> np.ndarray:
    """A plucked string as a sum of harmonics whose decay speeds up with harmonic number.

    ``slow`` is the extra per-harmonic decay curve: harmonic k is multiplied by ``slow ** (k - 1)``.
    """
    num_harmonics = max(1, min(8, int(0.45 / dt)))
    sin1, cos1 = _sin_cos(len(index), dt)
    two_cos = 2 * cos1
    # sin(k theta) by the Chebyshev recurrence costs a multiply-add per harmonic instead of a sin call.
    prev, cur = np.zeros_like(sin1), sin1
    decay = np.ones_like(sin1)
    out = np.zeros_like(sin1)
    total = 0.0
    for k in range(1, num_harmonics + 1):
        # Plucking at 1/5 of the string length weakens every 5th harmonic, as on a real string.
        amp = abs(np.sin(np.pi * k * 0.2)) / k**1.1
        out += np.float32(amp) * cur * decay
        total += amp
        if k < num_harmonics:
            prev, cur = cur, two_cos * cur - prev
            decay *= slow
    return out / np.float32(total)


OSCILLATORS = {"sine": _sine, "triangle": _triangle, "saw": _saw, "square": _square, "pluck": _pluck}


def _render(events: list[tuple[float, float, int, float]], timbre: str, n: int, sr: int, rng) -> np.ndarray:
    """Mix (onset s, length s, midi, velocity) events into a float32 buffer of n samples."""
    if timbre == "pluck":
        attack, sustain, decay = 0.003, 0.0, rng.uniform(0.3, 1.0)
    else:
        attack, sustain, decay = rng.uniform(0.005, 0.04), rng.uniform(0.4, 0.9), rng.uniform(0.05, 0.4)
    # Curves that depend only on time since the note's onset are computed once per clip and sliced per note.
    index = np.arange(n, dtype=np.float32)
    body = np.float32(sustain) + np.float32(1 - sustain) * _exp_decay(n, 1 / (decay * sr))
    # Only the pluck uses the extra decay of its upper harmonics (see _pluck).
    slow = _exp_decay(n, 4.0 / sr) if timbre == "pluck" else None
    attack_ramp = np.minimum(index[: max(1, int(attack * sr))] / np.float32(attack * sr), 1)
    release_ramp = np.minimum(index[: max(1, int(0.02 * sr))] / np.float32(0.02 * sr), 1)[::-1]
    out = np.zeros(n, dtype=np.float32)
    for onset, length, midi, velocity in events:
        start = int(round(onset * sr))
        stop = min(n, start + max(1, int(round(length * sr))))
        if start >= stop:
            continue
        m = stop - start
        note = OSCILLATORS[timbre](index[:m], midi_to_hz(midi) / sr, None if slow is None else slow[:m])
        # Attack ramp and decay to a sustain level give every note a clear onset; the release ramp avoids a click.
        note *= body[:m]
        a, r = min(m, len(attack_ramp)), min(m, len(release_ramp))
        note[:a] *= attack_ramp[:a]
        note[m - r :] *= release_ramp[len(release_ramp) - r :]
        note *= np.float32(velocity)
        out[start:stop] += note
    return out


def _lowpass(x: np.ndarray, cutoff_hz: float, sr: int) -> np.ndarray:
    """FFT low-pass with a half-octave cosine roll-off (no scipy at runtime)."""
    # A power-of-two length keeps the FFT fast whatever the clip length (prime lengths are very slow).
    nfft = 1 << (len(x) - 1).bit_length()
    spec = np.fft.rfft(x, n=nfft)
    freqs = np.fft.rfftfreq(nfft, 1 / sr)
    ratio = np.clip(np.log2(np.maximum(freqs, 1e-6) / cutoff_hz) / 0.5, 0, 1)
    spec *= 0.5 + 0.5 * np.cos(np.pi * ratio)
    return np.fft.irfft(spec, n=nfft)[: len(x)].astype(np.float32)


def _max_overlap(events: list[tuple[float, float, int, float]], duration: float) -> int:
    """Largest number of notes sounding at the same time (a note ends where the clip does at the latest)."""
    starts = np.array([onset for onset, _, _, _ in events])
    ends = np.minimum(starts + np.array([length for _, length, _, _ in events]), duration)
    starts, ends = starts[starts < duration], ends[starts < duration]
    # The tolerance stops a note that ends exactly where another starts from counting as overlapping it.
    sounding = (starts[None, :] <= starts[:, None]) & (starts[:, None] < ends[None, :] - 1e-9)
    return int(sounding.sum(axis=1).max())


def make_clip(
    index: int,
    sample_rate: int = 16000,
    min_duration: float = 0.5,
    max_duration: float = 3.0,
    seed: int = 0,
) -> Clip:
    """Render clip number ``index`` of the synthetic dataset for ``seed``."""
    rng = np.random.default_rng([seed, index])
    n = max(1, int(round(rng.uniform(min_duration, max_duration) * sample_rate)))
    duration = n / sample_rate
    kind = KINDS[rng.choice(len(KINDS), p=list(KIND_WEIGHTS.values()))]
    timbre = TIMBRES[rng.integers(len(TIMBRES))]
    bpm = int(rng.integers(60, 181))
    beat = 60.0 / bpm
    events: list[tuple[float, float, int, float]] = []
    if kind == "note":
        midi = int(rng.integers(48, 80))
        events.append((rng.uniform(0, 0.1) * duration, duration, midi, 1.0))
        what = f"a single {note_name(midi)} note"
    elif kind == "chord":
        size = int(rng.integers(2, MAX_POLYPHONY + 1))
        name, shape = list(CHORDS[size].items())[rng.integers(len(CHORDS[size]))]
        root = int(rng.integers(48, 68))
        step = beat * float(rng.choice([1, 2, 4]))
        onsets = np.arange(0.0, duration, step)
        for onset in onsets:
            velocity = rng.uniform(0.7, 1.0)
            events.extend((onset, step, root + offset, velocity) for offset in shape)
        strikes = "once" if len(onsets) == 1 else f"{len(onsets)} times"
        what = f"a {bpm} bpm {note_name(root)} {name} chord struck {strikes}"
    elif kind == "melody":
        scale_name, scale = list(SCALES.items())[rng.integers(len(SCALES))]
        root = int(rng.integers(55, 70))
        step = beat / float(rng.choice([1, 2]))
        degree, onset = int(rng.integers(0, len(scale))), 0.0
        while onset < duration:
            length = step * float(rng.choice([1, 1, 2]))
            octave, pos = divmod(degree, len(scale))
            events.append((onset, 0.9 * length, root + 12 * octave + scale[pos], rng.uniform(0.6, 1.0)))
            # A bounded random walk keeps melodies stepwise and inside two octaves above the root.
            degree = int(np.clip(degree + rng.integers(-2, 3), 0, 2 * len(scale) - 1))
            onset += length
        what = f"a {bpm} bpm melody of {len(events)} notes in {note_name(root)[:-1]} {scale_name}"
    else:
        size = int(rng.integers(2, MAX_POLYPHONY + 1))
        name, shape = list(CHORDS[size].items())[rng.integers(len(CHORDS[size]))]
        root = int(rng.integers(48, 68))
        step = beat / float(rng.choice([1, 2]))
        pattern = list(shape) + list(shape[-2:0:-1]) if rng.random() < 0.5 else list(shape)
        onsets = np.arange(0.0, duration, step)
        # Each note rings for `size` steps, so after the first cycle exactly `size` notes sound together.
        events.extend(
            (onset, size * step, root + pattern[i % len(pattern)], rng.uniform(0.6, 1.0))
            for i, onset in enumerate(onsets)
        )
        what = f"a {bpm} bpm arpeggio of {len(events)} notes over a {note_name(root)} {name} chord"

    x = _render(events, timbre, n, sample_rate, rng)
    x /= max(float(np.abs(x).max()), 1e-6)
    # Log-uniform noise levels spread evenly in decibels, from barely audible to about 0 dB SNR.
    noise_level = 0.0 if rng.random() < 0.2 else float(np.exp(rng.uniform(np.log(MIN_NOISE), np.log(MAX_NOISE))))
    # Uniform white noise with standard deviation noise_level: it sounds like Gaussian noise at a quarter of the cost.
    if noise_level > 0:
        x += np.float32(noise_level * 2 * np.sqrt(3)) * (rng.random(n, dtype=np.float32) - np.float32(0.5))
    degradation = DEGRADATIONS[rng.integers(len(DEGRADATIONS))] if rng.random() < 0.2 else None
    if degradation == "clipped":
        x = np.clip(x * np.float32(rng.uniform(2, 6)), -1, 1)
    elif degradation == "low-passed":
        x = _lowpass(x, rng.uniform(400, 1500), sample_rate)
    elif degradation == "bit-crushed":
        levels = np.float32(2 ** (int(rng.integers(3, 7)) - 1))
        x = np.round(x / max(float(np.abs(x).max()), 1e-6) * levels) / levels
    # Peak-normalise strictly below 1.0 at a random level so loudness varies between clips.
    x *= np.float32(rng.uniform(0.5, 0.95) / max(float(np.abs(x).max()), 1e-6))

    polyphony = _max_overlap(events, duration)
    notes_per_second = len({onset for onset, _, _, _ in events}) / duration
    if noise_level == 0:
        noise_phrase = "clean"
    else:
        noise_phrase = "with " + (
            "light" if noise_level < 0.02 else "moderate" if noise_level < DEGRADED_NOISE_LEVEL else "heavy"
        )
        noise_phrase += " noise"
    description = f"{what} played on {TIMBRE_PHRASES[timbre]}, {noise_phrase}"
    if degradation:
        description += f", {degradation}"
    return Clip(
        array=x.astype(np.float32, copy=False),
        sample_rate=sample_rate,
        kind=kind,
        timbre=timbre,
        bpm=bpm,
        polyphony=polyphony,
        noise_level=noise_level,
        notes_per_second=notes_per_second,
        difficulty=difficulty_score(polyphony, noise_level, notes_per_second),
        quality="degraded" if degradation or noise_level >= DEGRADED_NOISE_LEVEL else "clean",
        description=description,
        frequencies=[midi_to_hz(midi) for _, _, midi, _ in events],
    )


def _float32_lists(arrays: list[np.ndarray]) -> pa.ListArray:
    """One Arrow list<float32> array over many numpy arrays without going through Python floats."""
    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    np.cumsum([len(a) for a in arrays], out=offsets[1:])
    # Arrow's list type has int32 offsets; callers build chunks well below 2**31 samples.
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(np.concatenate(arrays)))


def _table(clips: list[tuple[int, Clip]]) -> pa.RecordBatch:
    """Arrow record batch of clips laid out as FEATURES."""
    sample_rates = pa.array([c.sample_rate for _, c in clips], pa.int32())
    audio = pa.StructArray.from_arrays(
        [_float32_lists([c.array for _, c in clips]), sample_rates], names=["array", "sampling_rate"]
    )
    freqs = _float32_lists([np.asarray(c.frequencies, dtype=np.float32) for _, c in clips])
    columns = {
        "audio": audio,
        "clip_id": pa.array([i for i, _ in clips], pa.int32()),
        "kind": pa.array([c.kind for _, c in clips], pa.string()),
        "timbre": pa.array([c.timbre for _, c in clips], pa.string()),
        "bpm": pa.array([c.bpm for _, c in clips], pa.int32()),
        "duration": pa.array([c.duration for _, c in clips], pa.float32()),
        "polyphony": pa.array([c.polyphony for _, c in clips], pa.int32()),
        "noise_level": pa.array([c.noise_level for _, c in clips], pa.float32()),
        "notes_per_second": pa.array([c.notes_per_second for _, c in clips], pa.float32()),
        "frequencies": freqs,
        "difficulty": pa.array([c.difficulty for _, c in clips], pa.float32()),
        "quality": pa.array([c.quality for _, c in clips], pa.string()),
        "description": pa.array([c.description for _, c in clips], pa.string()),
    }
    return pa.RecordBatch.from_pydict(columns, schema=FEATURES.arrow_schema)


def _dataset(clips: list[tuple[int, Clip]], fingerprint: str, chunk: int = 512) -> datasets.Dataset:
    """An in-memory Dataset built from Arrow arrays directly (from_dict walks every sample in Python: ~10x slower)."""
    batches = [_table(clips[i : i + chunk]) for i in range(0, len(clips), chunk)]
    table = pa.Table.from_batches(batches, schema=FEATURES.arrow_schema)
    # An explicit fingerprint skips datasets hashing every sample, and is stable so map() caches can be reused.
    info = datasets.DatasetInfo(features=FEATURES)
    return datasets.Dataset(InMemoryTable(table), info=info, fingerprint=fingerprint)


def _fingerprint(key: str, split: str) -> str:
    return hashlib.sha256(f"hf-audio-trainer-synthetic-{key}-{split}".encode()).hexdigest()[:16]


def make_synthetic_dataset(
    num_clips: int = 2000,
    sample_rate: int = 16000,
    min_duration: float = 0.5,
    max_duration: float = 3.0,
    validation_fraction: float = 0.05,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
) -> datasets.DatasetDict:
    """The seeded synthetic music dataset with "train" and "validation" splits; with `cache_dir`, generated once
    into Arrow files there and memory-mapped (in memory otherwise)."""
    if num_clips < 1:
        raise ValueError(f"num_clips must be >= 1, got {num_clips}")
    if sample_rate < 1000:
        raise ValueError(f"sample_rate must be >= 1000 Hz, got {sample_rate}")
    if not 0 < min_duration <= max_duration:
        raise ValueError(f"need 0 < min_duration <= max_duration, got {min_duration} and {max_duration}")
    if not 0 <= validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    num_val = min(max(round(num_clips * validation_fraction), 1), num_clips - 1)
    val_ids = set(np.random.default_rng(seed).permutation(num_clips)[:num_val].tolist())
    key = f"{SYNTHETIC_VERSION}-{num_clips}-{sample_rate}-{min_duration}-{max_duration}-{validation_fraction}-{seed}"
    if cache_dir is not None:
        return _written(num_clips, val_ids, key, Path(cache_dir), (sample_rate, min_duration, max_duration, seed))
    clips = [(i, make_clip(i, sample_rate, min_duration, max_duration, seed)) for i in range(num_clips)]
    return datasets.DatasetDict(
        {
            split: _dataset(
                [c for c in clips if (c[0] in val_ids) == (split == "validation")], _fingerprint(key, split)
            )
            for split in ("train", "validation")
        }
    )


def _written(num_clips: int, val_ids: set[int], key: str, cache_dir: Path, clip_args: tuple) -> datasets.DatasetDict:
    """The splits generated straight into Arrow files under `cache_dir` (once) and memory-mapped: RAM stays flat
    however many clips there are."""
    files = {split: cache_dir / f"synthetic-{_fingerprint(key, split)}-{split}.arrow" for split in SPLITS}
    if not all(f.is_file() for f in files.values()):
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = {split: f.with_name(f.name + f".tmp{os.getpid()}") for split, f in files.items()}
        writers = {split: ArrowWriter(features=FEATURES, path=str(path)) for split, path in tmp.items()}
        for start in range(0, num_clips, WRITE_CHUNK):
            clips = [(i, make_clip(i, *clip_args)) for i in range(start, min(start + WRITE_CHUNK, num_clips))]
            for split, writer in writers.items():
                mine = [c for c in clips if (c[0] in val_ids) == (split == "validation")]
                if mine:
                    writer.write_table(pa.Table.from_batches([_table(mine)]))
        for split, writer in writers.items():
            writer.finalize()
            writer.close()
            os.replace(tmp[split], files[split])
    splits = {}
    for split, path in files.items():
        splits[split] = datasets.Dataset.from_file(str(path), info=datasets.DatasetInfo(features=FEATURES))
        splits[split]._fingerprint = _fingerprint(key, split)  # the in-memory build's: caches keyed on it are shared
    return datasets.DatasetDict(splits)
