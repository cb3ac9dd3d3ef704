"""Cached preprocessing: codes equal the codec's own, a second run encodes nothing, an interrupted run resumes at
the first chunk it had not written, long tracks are encoded in pieces, EnCodec batches like it encodes alone."""

import json
import os

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from hf_audio_trainer.codecs import EncodecTokenizer, MelKMeansTokenizer
from hf_audio_trainer.data import preprocess
from hf_audio_trainer.data.preprocess import encode_dataset
from hf_audio_trainer.data.synthetic import make_synthetic_dataset
from hf_audio_trainer.errors import ConfigError
from tests.helpers import tiny_codec


@pytest.fixture(scope="module")
def clips():
    return make_synthetic_dataset(num_clips=30, seed=3)["train"]


@pytest.fixture(scope="module")
def tokenizer(clips):
    return MelKMeansTokenizer.fit([a["array"] for a in clips["audio"]], codebook_size=16, num_codebooks=2, seed=0)


class Counting:
    """A tokenizer that counts the clips it encodes, and can fail after a number of calls (a crash mid-run)."""

    def __init__(self, inner, fail_after: int | None = None):
        self.inner, self.fail_after, self.calls, self.clips = inner, fail_after, 0, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def encoder_on(self, device):
        return self

    def encode_batch(self, waves):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("killed")
        self.calls += 1
        self.clips += len(waves)
        return self.inner.encode_batch(waves)


def test_codes_match_the_codec_and_a_second_run_encodes_nothing(clips, tokenizer, tmp_path):
    acc = Accelerator(cpu=True)
    first = Counting(tokenizer)
    coded = encode_dataset(clips, first, acc, cache_dir=tmp_path, chunk_rows=8)
    assert first.clips == len(clips)
    for row in (0, 7, 8, len(clips) - 1):
        expected = tokenizer.encode(clips[row]["audio"]["array"]).numpy()
        np.testing.assert_array_equal(np.asarray(coded[row]["codes"]), expected)
        assert coded[row]["num_frames"] == expected.shape[1]
    assert list(coded["difficulty"]) == list(clips["difficulty"])  # kept columns stay aligned with their rows
    assert len(list(tmp_path.glob("*/chunk-*.arrow"))) == 4  # 30 rows in chunks of 8
    assert all(f["filename"].startswith(str(tmp_path)) for f in coded.cache_files)  # memory-mapped from the cache

    again = Counting(tokenizer)
    reused = encode_dataset(clips, again, acc, cache_dir=tmp_path, chunk_rows=8)
    assert again.calls == 0
    assert list(reused["codes"]) == list(coded["codes"])


def test_another_codec_or_setting_is_another_cache(clips, tokenizer, tmp_path):
    acc = Accelerator(cpu=True)
    encode_dataset(clips, tokenizer, acc, cache_dir=tmp_path)
    other = MelKMeansTokenizer.fit([a["array"] for a in clips["audio"]], codebook_size=16, num_codebooks=2, seed=1)
    counted = Counting(other)
    encode_dataset(clips, counted, acc, cache_dir=tmp_path)
    assert counted.clips == len(clips)
    cut = Counting(tokenizer)
    short = encode_dataset(clips, cut, acc, cache_dir=tmp_path, max_duration_seconds=0.5)
    assert cut.clips == len(clips) and max(short["num_frames"]) == int(0.5 * 16000) // tokenizer.hop_length
    assert len(list(tmp_path.glob("*/done.json"))) == 3


def test_an_interrupted_run_resumes_at_the_first_chunk_it_had_not_written(clips, tokenizer, tmp_path):
    acc = Accelerator(cpu=True)
    straight = encode_dataset(clips, tokenizer, acc, cache_dir=tmp_path / "straight", chunk_rows=8)
    # one codec call per chunk here (8 short clips fit one batch): fail in the third chunk
    with pytest.raises(KeyboardInterrupt):
        encode_dataset(clips, Counting(tokenizer, fail_after=2), acc, cache_dir=tmp_path / "cut", chunk_rows=8)
    assert len(list((tmp_path / "cut").glob("*/chunk-*.arrow"))) == 2
    assert not list((tmp_path / "cut").glob("*/*.tmp*"))  # the chunk being written when it stopped left nothing
    resumed = Counting(tokenizer)
    result = encode_dataset(clips, resumed, acc, cache_dir=tmp_path / "cut", chunk_rows=8)
    assert resumed.clips == len(clips) - 16  # only the two chunks that were missing
    assert list(result["codes"]) == list(straight["codes"])


def test_long_tracks_are_encoded_in_pieces_that_line_up(tokenizer, monkeypatch):
    rng = np.random.default_rng(0)
    waves = [rng.standard_normal(16000 * 3).astype(np.float32) * 0.1, rng.standard_normal(5000).astype(np.float32)]
    whole = preprocess.encode_waves(tokenizer, waves)
    monkeypatch.setattr(preprocess, "PIECE_SECONDS", 1.0)
    pieces = preprocess.encode_waves(tokenizer, waves)
    assert [p.shape for p in pieces] == [w.shape for w in whole] == [(2, 150), (2, 15)]
    # only the frames at the two piece boundaries see the STFT's edge padding instead of the neighbouring audio
    differing = np.flatnonzero((pieces[0] != whole[0]).any(0))
    assert set(differing.tolist()) <= {49, 50, 99, 100}
    np.testing.assert_array_equal(pieces[1], whole[1])


def test_a_clip_shorter_than_a_frame_is_named(tokenizer, tmp_path):
    import datasets

    rows = {"audio": [{"array": np.zeros(16000, np.float32), "sampling_rate": 16000},
                      {"array": np.zeros(100, np.float32), "sampling_rate": 16000}]}  # fmt: skip
    short = datasets.Dataset.from_dict(rows)
    with pytest.raises(ConfigError, match=r"1 train clip\(s\) are shorter than one tokenizer frame .*: row 1;"):
        encode_dataset(short, tokenizer, Accelerator(cpu=True), cache_dir=tmp_path)


def test_encodec_batches_like_it_encodes_alone(tmp_path):
    codec = EncodecTokenizer.from_pretrained(tiny_codec(tmp_path / "codec"))
    rng = np.random.default_rng(1)
    same = [rng.standard_normal(8000).astype(np.float32) * 0.1 for _ in range(3)]
    for batched, wave in zip(codec.encode_batch(same), same, strict=True):
        torch.testing.assert_close(batched, codec.encode(wave), rtol=0, atol=0)
    longer, shorter = rng.standard_normal(9600).astype(np.float32) * 0.1, same[0]
    batched = codec.encode_batch([longer, shorter])
    torch.testing.assert_close(batched[0], codec.encode(longer), rtol=0, atol=0)
    alone = codec.encode(shorter)
    assert batched[1].shape == alone.shape == (codec.num_codebooks, 25)
    # the padding after the shorter clip reaches only its last frames, through the non-causal convolutions
    assert torch.equal(batched[1][:, :20], alone[:, :20])
    assert codec.fingerprint() == EncodecTokenizer.from_pretrained(tmp_path / "codec").fingerprint()


def test_text_states_equal_the_encoder_and_are_computed_once(tmp_path):
    import datasets
    from transformers import T5Config, T5EncoderModel

    from hf_audio_trainer.data.text import encode_texts

    torch.manual_seed(0)
    encoder = T5EncoderModel(T5Config(vocab_size=384, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2))
    ids = [[5, 6, 7], [], [9] * 11, [4, 4]]
    rows = datasets.Dataset.from_dict({"text_ids": ids, "codes": [[[1]], [[2]], [[3]], [[4]]]})
    acc = Accelerator(cpu=True)
    out = preprocess.encode_text_states(rows, encoder, acc, "text_ids", "text_states", cache_dir=tmp_path, chunk_rows=3)
    assert out.column_names == ["text_ids", "codes", "text_states"]
    for got, want in zip(out["text_states"], encode_texts(encoder, ids, "cpu"), strict=True):
        np.testing.assert_allclose(np.asarray(got, dtype=np.float32).reshape(want.shape), want, rtol=1e-6, atol=1e-6)
    assert len(out[1]["text_states"]) == 0  # an empty description has no states (the null condition)
    with torch.no_grad():
        encoder.shared.weight.add_(1.0)  # other weights: another cache
    preprocess.encode_text_states(rows, encoder, acc, "text_ids", "text_states", cache_dir=tmp_path, chunk_rows=3)
    assert len(list(tmp_path.glob("*/done.json"))) == 2


@pytest.mark.parametrize("written", ["chunk-000000-of-000004.arrow", "done.json"])
def test_two_nodes_whose_ranks_share_a_pid_write_the_same_cache_at_once(
    clips, tokenizer, tmp_path, monkeypatch, written
):
    """Node A is about to rename a finished file into place when node B, a rank with the same pid on another host
    (containers number their processes alike), writes the same file: neither may crash, and the cache stays whole."""
    import socket

    straight = encode_dataset(clips, tokenizer, Accelerator(cpu=True), cache_dir=tmp_path / "straight", chunk_rows=8)
    real_replace, cut_in = os.replace, []

    def replace(src, dst):
        if os.path.basename(dst) == written and not cut_in:
            cut_in.append(dst)
            with monkeypatch.context() as node_b:
                node_b.setattr(socket, "gethostname", lambda: "node-b")
                encode_dataset(clips, tokenizer, Accelerator(cpu=True), cache_dir=tmp_path / "shared", chunk_rows=8)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    result = encode_dataset(clips, tokenizer, Accelerator(cpu=True), cache_dir=tmp_path / "shared", chunk_rows=8)
    assert cut_in  # node B did write in between
    assert list(result["codes"]) == list(straight["codes"])
    [done] = (tmp_path / "shared").glob("*/done.json")
    assert json.loads(done.read_text()) == {"rows": len(clips), "chunks": 4}
    assert not list((tmp_path / "shared").glob("*/*.tmp*"))
