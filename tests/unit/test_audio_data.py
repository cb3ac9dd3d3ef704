"""Audio decoding with soundfile + soxr, and dataset loading from folders, save_to_disk, the Hub and synthetic."""

import io
import re
from pathlib import Path

import datasets
import huggingface_hub
import numpy as np
import pytest
import soundfile as sf

from hf_audio_trainer.data.audio import AUDIO_EXTENSIONS, AudioDecodeError, decode_audio, load_audio_dataset
from hf_audio_trainer.errors import ConfigError

SR = 16000


def _sine(freq: float, sample_rate: int, seconds: float = 1.0) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * freq * np.arange(round(seconds * sample_rate)) / sample_rate)).astype(np.float32)


def _peak_hz(x: np.ndarray, sample_rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spectrum) * sample_rate / len(x))


def _folder(root: Path, names: list[str], sample_rate: int = 8000) -> Path:
    """Audio files named `names` under root, each a 0.25 s sine whose pitch encodes its position."""
    for i, name in enumerate(names):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, _sine(200 + 50 * i, sample_rate, 0.25), sample_rate)
    return root


@pytest.mark.parametrize(
    ("ext", "rate", "channels"),
    [
        ("wav", 8000, 1),
        ("flac", 22050, 1),
        ("ogg", 44100, 1),
        ("mp3", 44100, 1),
        ("wav", 44100, 2),
        ("flac", 8000, 2),
        ("wav", 16000, 1),
    ],
)
def test_files_decode_to_mono_float32_at_16k_keeping_pitch(tmp_path, ext, rate, channels):
    tone = _sine(440.0, rate)
    data = np.stack([tone] * channels, axis=1) if channels == 2 else tone
    path = tmp_path / f"tone.{ext}"
    sf.write(path, data, rate)
    out = decode_audio(str(path), SR)
    assert out.dtype == np.float32 and out.ndim == 1
    assert abs(len(out) - SR) <= 1
    assert abs(_peak_hz(out, SR) - 440.0) < 2.0
    assert 0.4 < np.abs(out).max() < 0.6
    np.testing.assert_array_equal(decode_audio(path, SR), out)  # a pathlib.Path works too


def test_stereo_is_averaged_to_mono(tmp_path):
    left, right = _sine(300, SR, 0.1), _sine(700, SR, 0.1) * 0.5
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], axis=1), SR, subtype="FLOAT")
    np.testing.assert_allclose(decode_audio(path, SR), (left + right) / 2, atol=1e-7)


def test_decoded_dict_inputs():
    tone = _sine(440.0, 8000)
    out = decode_audio({"array": tone.tolist(), "sampling_rate": 8000}, SR)
    assert out.dtype == np.float32 and abs(len(out) - SR) <= 1
    assert abs(_peak_hz(out, SR) - 440.0) < 2.0
    same_rate = decode_audio({"array": tone.astype(np.float64), "sampling_rate": 8000}, 8000)
    np.testing.assert_array_equal(same_rate, tone)
    other = tone * 0.5
    expected = (tone + other) / 2
    np.testing.assert_allclose(decode_audio({"array": np.stack([tone, other]), "sampling_rate": 8000}, 8000), expected)
    np.testing.assert_allclose(
        decode_audio({"array": np.stack([tone, other], axis=1), "sampling_rate": 8000}, 8000), expected
    )


def test_bytes_and_path_dicts(tmp_path):
    tone = _sine(440.0, 22050)
    buffer = io.BytesIO()
    sf.write(buffer, tone, 22050, format="FLAC")
    from_bytes = decode_audio({"bytes": buffer.getvalue(), "path": "whatever.flac"}, SR)
    assert abs(len(from_bytes) - SR) <= 1
    path = tmp_path / "tone.flac"
    path.write_bytes(buffer.getvalue())
    np.testing.assert_array_equal(decode_audio({"bytes": None, "path": str(path)}, SR), from_bytes)


def test_corrupt_file_names_the_file_and_the_fix(tmp_path):
    path = tmp_path / "broken.wav"
    path.write_bytes(np.random.default_rng(0).bytes(2000))
    with pytest.raises(AudioDecodeError, match="broken.wav") as info:
        decode_audio(str(path), SR, where="row 17")
    assert "row 17" in str(info.value) and "re-encode it or remove it from the dataset" in str(info.value)
    with pytest.raises(AudioDecodeError, match="row 3"):
        decode_audio({"bytes": b"not audio at all", "path": None}, SR, where="row 3")


def test_missing_file_and_bad_values():
    with pytest.raises(AudioDecodeError, match="/no/such/dir/clip.wav"):
        decode_audio("/no/such/dir/clip.wav", SR)
    with pytest.raises(AudioDecodeError, match="row 2"):
        decode_audio({"bytes": None, "path": None}, SR, where="row 2")
    with pytest.raises(AudioDecodeError, match="int"):
        decode_audio(42, SR)
    with pytest.raises(AudioDecodeError, match="NaN"):
        decode_audio({"array": [0.0, float("nan")], "sampling_rate": SR}, SR)
    assert issubclass(AudioDecodeError, ValueError)


def test_folder_without_metadata(tmp_path):
    names = [f"sub/{i:02d}.wav" for i in range(5)] + ["a.flac", "b.ogg", "c.WAV", "d.mp3"]
    root = _folder(tmp_path / "data", names, sample_rate=8000)
    (root / "notes.txt").write_text("not audio")
    _folder(root / ".hidden", ["ignored.wav"])
    ds = load_audio_dataset(str(root), validation_split_percentage=20, seed=0)
    assert (ds["train"].num_rows, ds["validation"].num_rows) == (7, 2)
    assert isinstance(ds["train"].features["audio"], datasets.Audio)
    assert ds["train"].features["audio"].decode is False
    paths = {row["audio"]["path"] for split in ds.values() for row in split}
    assert paths == {str((root / n).resolve()) for n in names}
    row = ds["validation"][0]
    assert row["audio"]["bytes"] is None
    out = decode_audio(row["audio"], SR, where="validation row 0")
    assert abs(len(out) - 4000) <= 1
    again = load_audio_dataset(str(root), validation_split_percentage=20, seed=0)
    assert again["validation"]["audio"] == ds["validation"]["audio"]


def test_folder_with_metadata_merges_columns(tmp_path):
    names = ["x/one.wav", "two.wav", "three.wav", "four.wav"]
    root = _folder(tmp_path, names)
    (root / "metadata.csv").write_text(
        "file_name,label,speaker\nx/one.wav,1,ann\ntwo.wav,2,bob\nthree.wav,3,cy\nfour.wav,4,dee\n"
    )
    ds = load_audio_dataset(str(root), validation_split_percentage=25)
    rows = [r for split in ds.values() for r in split]
    assert (ds["train"].num_rows, ds["validation"].num_rows) == (3, 1)
    assert set(ds["train"].column_names) == {"audio", "label", "speaker"}
    by_label = {r["label"]: r for r in rows}
    assert sorted(by_label) == [1, 2, 3, 4]
    assert by_label[1]["audio"]["path"] == str((root / "x/one.wav").resolve()) and by_label[1]["speaker"] == "ann"
    # Files were written with rising pitch in the order of `names`, so decoding row "two" gives 250 Hz.
    assert abs(_peak_hz(decode_audio(by_label[2]["audio"], 8000), 8000) - 250) < 10


def test_folder_metadata_errors(tmp_path):
    root = _folder(tmp_path, ["a.wav", "b.wav"])
    (root / "metadata.csv").write_text("file_name,label\na.wav,1\nmissing.wav,2\n")
    with pytest.raises(ValueError, match="missing.wav"):
        load_audio_dataset(str(root))
    (root / "metadata.csv").write_text("file_name,label\na.wav,1\n")
    with pytest.raises(ValueError, match="b.wav"):
        load_audio_dataset(str(root))
    (root / "metadata.csv").write_text("name,label\na.wav,1\nb.wav,2\n")
    with pytest.raises(ValueError, match="file_name"):
        load_audio_dataset(str(root))


def test_folder_metadata_empty_cells(tmp_path):
    root = _folder(tmp_path, ["a.wav", "b.wav", "c.wav", "d.wav"])
    (root / "metadata.csv").write_text(
        "file_name,description,quality,difficulty,notes\n"
        "a.wav,a calm piano,clean,0.5,\n"
        "b.wav,,noisy,,\n"  # no description, no difficulty
        "c.wav,NA,clean,0.2,\n"  # a description is what is written, even a word pandas reads as missing
        "d.wav,rain on a roof,clean,0.1,\n"
    )
    ds = load_audio_dataset(str(root), validation_split_percentage=25)
    rows = {Path(r["audio"]["path"]).name: r for split in ds.values() for r in split}
    # An empty text cell is an empty text (the text families' null condition), not a float NaN that crashes Arrow.
    assert [rows[n]["description"] for n in ("a.wav", "b.wav", "c.wav", "d.wav")] == [
        "a calm piano",
        "",
        "NA",
        "rain on a roof",
    ]
    assert ds["train"].features["description"] == datasets.Value("string")
    assert {r["notes"] for r in rows.values()} == {""}  # a column with nothing in it holds no numbers either
    # A number column keeps its numbers; its empty cell stays missing, as before.
    assert ds["train"].features["difficulty"] == datasets.Value("float64")
    assert np.isnan(rows["b.wav"]["difficulty"]) and rows["c.wav"]["difficulty"] == 0.2
    assert rows["b.wav"]["quality"] == "noisy"


def test_folder_metadata_refuses_paths_outside_the_folder_by_name(tmp_path):
    root = _folder(tmp_path / "data", ["a.wav", "b.wav"])
    _folder(tmp_path, ["outside.wav"])
    for name in ("../outside.wav", str(tmp_path / "outside.wav"), "sub/../../outside.wav"):
        (root / "metadata.csv").write_text(f"file_name,label\na.wav,1\nb.wav,2\n{name},3\n")
        with pytest.raises(ConfigError, match=rf"metadata.csv.*row 3.*{re.escape(name)}.*outside"):
            load_audio_dataset(str(root))
    (root / "metadata.csv").write_text("file_name,label\na.wav,1\n,2\nb.wav,3\n")
    with pytest.raises(ConfigError, match=r"metadata.csv.*row 2.*empty file_name"):
        load_audio_dataset(str(root))


def test_folder_metadata_refuses_a_file_listed_twice(tmp_path):
    root = _folder(tmp_path, ["a.wav", "b.wav", "c.wav"])
    # two rows for one file could put it in both train and validation
    (root / "metadata.csv").write_text("file_name,label\na.wav,1\nb.wav,2\nc.wav,3\n./b.wav,4\n")
    with pytest.raises(ConfigError, match=r"metadata.csv lists b.wav twice \(rows 2 and 4\)"):
        load_audio_dataset(str(root))


def test_empty_folder_lists_extensions(tmp_path):
    (tmp_path / "readme.txt").write_text("nothing here")
    with pytest.raises(ValueError, match="no audio files") as info:
        load_audio_dataset(str(tmp_path))
    assert all(ext in str(info.value) for ext in AUDIO_EXTENSIONS)


def test_save_to_disk_dataset_round_trip_embeds_audio(tmp_path):
    root = _folder(tmp_path / "src", [f"{i}.wav" for i in range(5)])
    folder = load_audio_dataset(str(root), validation_split_percentage=20)
    saved = tmp_path / "saved"
    datasets.concatenate_datasets([folder["train"], folder["validation"]]).save_to_disk(str(saved))
    for path in root.glob("*.wav"):
        path.unlink()  # save_to_disk embedded the bytes, so the originals are no longer needed
    ds = load_audio_dataset(str(saved), validation_split_percentage=20)
    assert (ds["train"].num_rows, ds["validation"].num_rows) == (4, 1)
    out = decode_audio(ds["train"][0]["audio"], 8000, where="train row 0")
    assert len(out) == 2000


def test_save_to_disk_dataset_dict_uses_its_validation_or_test_split(tmp_path):
    array = {"array": _sine(440, 8000, 0.1), "sampling_rate": 8000}
    train = datasets.Dataset.from_dict({"audio": [array] * 3, "text": ["a", "b", "c"]})
    held = datasets.Dataset.from_dict({"audio": [array] * 2, "text": ["d", "e"]})
    datasets.DatasetDict({"train": train, "validation": held}).save_to_disk(str(tmp_path / "v"))
    datasets.DatasetDict({"train": train, "test": held}).save_to_disk(str(tmp_path / "t"))
    for name in ("v", "t"):
        ds = load_audio_dataset(str(tmp_path / name))
        assert ds["train"]["text"] == ["a", "b", "c"] and ds["validation"]["text"] == ["d", "e"]
        assert len(decode_audio(ds["validation"][1]["audio"], 16000)) == 1600


def test_decoding_audio_feature_is_cast_to_undecoded(tmp_path):
    root = _folder(tmp_path / "src", ["a.wav", "b.wav", "c.wav"])
    paths = [str(p) for p in sorted(root.glob("*.wav"))]
    ds = datasets.Dataset.from_dict({"audio": paths}).cast_column("audio", datasets.Audio())
    ds.save_to_disk(str(tmp_path / "saved"))
    loaded = load_audio_dataset(str(tmp_path / "saved"), validation_split_percentage=34)
    assert loaded["train"].features["audio"].decode is False
    assert len(decode_audio(loaded["train"][0]["audio"], 8000)) == 2000


def test_missing_audio_column_lists_columns(tmp_path):
    array = {"array": _sine(440, 8000, 0.1), "sampling_rate": 8000}
    datasets.Dataset.from_dict({"sound": [array] * 4, "label": [0, 1, 0, 1]}).save_to_disk(str(tmp_path / "s"))
    with pytest.raises(ValueError, match="--audio_column") as info:
        load_audio_dataset(str(tmp_path / "s"))
    assert "'sound'" in str(info.value) and "'label'" in str(info.value)
    ds = load_audio_dataset(str(tmp_path / "s"), audio_column="sound", validation_split_percentage=25)
    assert (ds["train"].num_rows, ds["validation"].num_rows) == (3, 1)


def test_bad_paths_and_split_percentages(tmp_path):
    for name in ("./no/such/folder", str(tmp_path / "missing"), "~/definitely/not/here/xyz"):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            load_audio_dataset(name)
    afile = tmp_path / "clip.wav"
    sf.write(afile, _sine(440, 8000, 0.1), 8000)
    with pytest.raises(ValueError, match="is a file"):
        load_audio_dataset(str(afile))
    for bad in (0, -5, 50.5, 100):
        with pytest.raises(ValueError, match="validation_split_percentage"):
            load_audio_dataset(str(tmp_path / "missing"), validation_split_percentage=bad)
    one = _folder(tmp_path / "one", ["only.wav"])
    with pytest.raises(ValueError, match="at least 2"):
        load_audio_dataset(str(one))


def test_unreachable_hub_id_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="neither an existing local folder nor a loadable Hub dataset id") as info:
        load_audio_dataset("nobody-xyz/not-a-real-dataset-123")
    assert "nobody-xyz/not-a-real-dataset-123" in str(info.value)


def test_synthetic_through_the_loader():
    ds = load_audio_dataset(None, synthetic_num_clips=20, validation_split_percentage=10, seed=2)
    assert (ds["train"].num_rows, ds["validation"].num_rows) == (18, 2)
    row = ds["train"].with_format("numpy")[0]
    out = decode_audio(row["audio"], SR)
    np.testing.assert_array_equal(out, row["audio"]["array"])
    named = load_audio_dataset("synthetic", synthetic_num_clips=20, validation_split_percentage=10, seed=2)
    assert named["train"]["description"] == ds["train"]["description"]
