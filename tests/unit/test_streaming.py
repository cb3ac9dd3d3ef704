"""Streamed shards: every row once per epoch, disjoint equal shares per process, exact resume without replay."""

import io
import json
import random
import tarfile
import warnings
from pathlib import Path
from types import SimpleNamespace

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hf_audio_trainer.data.streaming import ShardStream, count_rows, list_shards, steps_in_epoch, stream_state
from hf_audio_trainer.errors import ConfigError, MissingError

GROUP = 10  # parquet row-group size; blocks of 8 rows deliberately straddle row groups
BLOCK = 8


def _parquet(path: Path, ids: list[int], group: int = GROUP) -> str:
    """A parquet shard with an int `id` and an audio struct {bytes, path} as datasets stores an Audio column."""
    audio = [{"bytes": f"audio-{i}".encode(), "path": f"{i}.flac"} for i in ids]
    audio_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({"id": pa.array(ids, pa.int64()), "audio": pa.array(audio, audio_type)})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=group)
    return str(path)


def _parquet_shards(root: Path, sizes: list[int]) -> list[str]:
    """Shard s holds ids s*1000 .. s*1000+size-1, so an id tells its shard and its offset in the shard."""
    return [_parquet(root / f"shard-{s:05d}.parquet", [s * 1000 + i for i in range(n)]) for s, n in enumerate(sizes)]


def _add(tar: tarfile.TarFile, name: str, data: bytes | None = None) -> None:
    info = tarfile.TarInfo(name)
    if data is None:
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
    else:
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def _tar(path: Path, ids: list[int]) -> str:
    """A webdataset shard: <key>.flac (fake bytes), <key>.json {"id", "description"} and <key>.txt per sample."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for i in ids:
            _add(tar, f"{i:06d}.flac", f"flac-{i}".encode())
            _add(tar, f"{i:06d}.json", json.dumps({"id": i, "description": f"sound {i}"}).encode())
            _add(tar, f"{i:06d}.txt", f"caption {i}".encode())
    return str(path)


def _tar_shards(root: Path, sizes: list[int]) -> list[str]:
    return [_tar(root / f"shard-{s:05d}.tar", [s * 1000 + i for i in range(n)]) for s, n in enumerate(sizes)]


def _ids(rows) -> list[int]:
    return [row["id"] for row in rows]


def _quiet_stream(*args, **kwargs) -> ShardStream:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ShardStream(*args, **kwargs)


# ---- one process: every row once, a shuffle confined to blocks, reproducible orders


def test_one_epoch_yields_every_row_once_shuffled_within_blocks(tmp_path):
    shards = _parquet_shards(tmp_path, [37] * 5)
    stream = ShardStream(shards, seed=3, block_rows=BLOCK)
    ids = _ids(stream.iter_epoch(0))
    assert sorted(ids) == [s * 1000 + i for s in range(5) for i in range(37)]
    assert stream.rows_per_rank(0) == 185
    # Shards come whole in the epoch's order, and each block holds exactly its own 8 consecutive rows, permuted.
    shuffled = 0
    for position, shard in enumerate(stream.epoch_shards(0)):
        segment = ids[position * 37 : (position + 1) * 37]
        for block in range(0, 37, BLOCK):
            got = segment[block : block + BLOCK]
            assert sorted(got) == [shard * 1000 + i for i in range(block, min(block + BLOCK, 37))]
            shuffled += got != sorted(got)
    assert shuffled >= 20  # of 25 blocks; an unshuffled block of 8 has odds 1/40320


def test_orders_depend_on_seed_and_epoch_only(tmp_path):
    shards = _parquet_shards(tmp_path, [37] * 5)
    epoch0 = _ids(ShardStream(shards, seed=3, block_rows=BLOCK).iter_epoch(0))
    assert _ids(ShardStream(shards, seed=3, block_rows=BLOCK).iter_epoch(0)) == epoch0
    epoch1 = _ids(ShardStream(shards, seed=3, block_rows=BLOCK).iter_epoch(1))
    assert sorted(epoch1) == sorted(epoch0) and epoch1 != epoch0
    assert _ids(ShardStream(shards, seed=4, block_rows=BLOCK).iter_epoch(0)) != epoch0


def test_rows_keep_the_audio_struct_and_columns_select(tmp_path):
    path = tmp_path / "train-00000-of-00001.parquet"
    audio = [{"bytes": b"RIFF-fake-0", "path": "a.wav"}, {"bytes": b"RIFF-fake-1", "path": "b.wav"}]
    ds = datasets.Dataset.from_dict({"audio": audio, "id": [0, 1]})
    ds.cast_column("audio", datasets.Audio(decode=False)).to_parquet(str(path))
    rows = list(ShardStream([str(path)], seed=0, block_rows=1).iter_epoch(0))
    assert rows == [{"audio": audio[0], "id": 0}, {"audio": audio[1], "id": 1}]
    assert list(ShardStream([str(path)], seed=0, block_rows=1, columns=["id"]).iter_epoch(0)) == [{"id": 0}, {"id": 1}]
    with pytest.raises(ConfigError, match="'label'"):
        ShardStream([str(path)], seed=0, columns=["id", "label"])


# ---- several processes


def test_two_ranks_on_four_shards_read_disjoint_equal_shares(tmp_path):
    # Shares pair the 20-row shard with a 37-row one (57 rows) and leave 37 + 37 = 74: all stop at 57.
    shards = _parquet_shards(tmp_path, [37, 37, 37, 20])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the divisible case must not warn
        ranks = [ShardStream(shards, seed=5, rank=r, world=2, block_rows=BLOCK) for r in range(2)]
    for epoch in range(3):
        own = [ranks[r].epoch_shards(epoch) for r in range(2)]
        assert sorted(own[0] + own[1]) == [0, 1, 2, 3]
        assert ranks[0].rows_per_rank(epoch) == ranks[1].rows_per_rank(epoch) == 57
        rows = [_ids(ranks[r].iter_epoch(epoch)) for r in range(2)]
        assert len(rows[0]) == len(rows[1]) == 57
        for r in range(2):
            assert {i // 1000 for i in rows[r]} <= set(own[r])  # a rank reads only its own shards
        assert not set(rows[0]) & set(rows[1])
        # The 17 rows dropped are the tail of the 74-row rank: rows of its last shard only.
        long = 0 if 3 not in own[0] else 1
        dropped = {s * 1000 + i for s in own[long] for i in range(37)} - set(rows[long])
        assert len(dropped) == 17 and {i // 1000 for i in dropped} == {own[long][-1]}
        assert len(set(rows[0]) | set(rows[1])) == 37 * 3 + 20 - 17


def test_two_ranks_on_five_shards_warn_and_split_rows(tmp_path):
    shards = _parquet_shards(tmp_path, [37] * 5)
    with pytest.warns(UserWarning, match="do not divide among 2 processes"):
        rank0 = ShardStream(shards, seed=5, rank=0, world=2, block_rows=BLOCK)
    rank1 = _quiet_stream(shards, seed=5, rank=1, world=2, block_rows=BLOCK)
    assert rank0.epoch_shards(1) == rank1.epoch_shards(1) and sorted(rank0.epoch_shards(1)) == [0, 1, 2, 3, 4]
    rows = [_ids(rank0.iter_epoch(1)), _ids(rank1.iter_epoch(1))]
    assert len(rows[0]) == len(rows[1]) == 185 // 2 == rank0.rows_per_rank(1)
    assert not set(rows[0]) & set(rows[1])
    # The two ranks interleave the one-process order: rank r holds its positions r, r + 2, r + 4 ...
    single = _ids(ShardStream(shards, seed=5, block_rows=BLOCK).iter_epoch(1))
    assert rows[0] == single[0::2][:92] and rows[1] == single[1::2][:92]


def test_fewer_shards_than_processes_warns(tmp_path):
    shards = _parquet_shards(tmp_path, [37] * 3)
    with pytest.warns(UserWarning, match="re-shard the dataset into a multiple of 4 shards"):
        stream = ShardStream(shards, seed=0, rank=3, world=4, block_rows=BLOCK)
    assert stream.rows_per_rank(0) == 111 // 4 == len(list(stream.iter_epoch(0)))


# ---- resume


def _check_resume(shards: list[str], world: int, slack, seed: int = 11, trials: int = 25) -> None:
    """Resuming at random rows gives the straight run's tail, reading at most `slack(stride)` rows it does not yield."""
    rng = random.Random(seed)
    for rank in range(world):
        stream = _quiet_stream(shards, seed=seed, rank=rank, world=world, block_rows=BLOCK)
        stride = 1 if stream.sharded else world
        for epoch in range(2):
            straight = list(stream.iter_epoch(epoch))
            starts = {0, len(straight)} | {rng.randrange(len(straight) + 1) for _ in range(trials)}
            for start in sorted(starts):
                resumed = _quiet_stream(shards, seed=seed, rank=rank, world=world, block_rows=BLOCK)
                rows = list(resumed.iter_epoch(epoch, start))
                assert rows == straight[start:], (rank, epoch, start)
                # A replay from the epoch's start would read `start` more rows: this bound does not grow with it.
                assert resumed.rows_read <= len(rows) * stride + slack, (rank, epoch, start, resumed.rows_read)


def test_parquet_resume_reads_only_the_block_it_starts_in(tmp_path):
    shards = _parquet_shards(tmp_path, [37, 37, 37, 20])
    # Before the first row: the row group holding its block (<= 9 rows) and the block up to it (<= 7 rows); after
    # the last: the rest of its block and row group. Nothing of earlier shards or blocks.
    slack = 2 * (GROUP - 1 + BLOCK - 1)
    for world in (1, 2, 3):  # 3 does not divide 4 shards: each rank reads everything and keeps every 3rd row
        _check_resume(shards, world, slack)


def test_parquet_resume_with_aligned_row_groups_costs_at_most_a_block(tmp_path):
    shards = [_parquet(tmp_path / f"{s}.parquet", [s * 1000 + i for i in range(37)], group=BLOCK) for s in range(3)]
    _check_resume(shards, 1, slack=2 * (BLOCK - 1))


def test_tar_resume_reads_no_earlier_sample_data(tmp_path):
    shards = _tar_shards(tmp_path, [21, 30, 17, 9])
    # Samples before the block are skipped by their headers; only the block's head and the last block's tail are read.
    _check_resume(shards, 2, slack=2 * (BLOCK - 1), trials=10)


def test_resume_outside_the_epoch_is_refused(tmp_path):
    stream = ShardStream(_parquet_shards(tmp_path, [37, 37]), seed=0, block_rows=BLOCK)
    with pytest.raises(ConfigError, match="outside epoch 0's 74 rows"):
        stream.iter_epoch(0, 75)
    assert list(stream.iter_epoch(0, 74)) == [] and stream.rows_read == 0


# ---- trainer positions


def test_stream_state_matches_a_straight_walk_over_uneven_epochs(tmp_path):
    # Per-epoch rows per rank are min over the permutation's pairs: 30, 40 or 47, so epochs hold 4, 5 or 6 steps.
    shards = _parquet_shards(tmp_path, [37, 30, 20, 10])
    stream = ShardStream(shards, seed=2, rank=1, world=2, block_rows=BLOCK)
    per_step = 7
    lengths = [steps_in_epoch(stream, epoch, per_step) for epoch in range(6)]
    assert len(set(lengths)) > 1 and set(lengths) <= {4, 5, 6}
    walk = [(epoch, step * per_step) for epoch in range(6) for step in range(lengths[epoch])]
    for step, expected in enumerate(walk):
        assert stream_state(step, per_step, stream) == expected
    assert stream_state(lengths[0], per_step, stream) == (1, 0)  # the epoch's partial tail is never a step
    # Resuming at the state gives the same next batch as the straight run.
    for step in (3, lengths[0], lengths[0] + lengths[1] + 2):
        epoch, start = stream_state(step, per_step, stream)
        straight = list(stream.iter_epoch(epoch))[start : start + per_step]
        assert (
            list(ShardStream(shards, seed=2, rank=1, world=2, block_rows=BLOCK).iter_epoch(epoch, start))[:per_step]
            == straight
        )


def test_batch_larger_than_an_epoch_is_refused(tmp_path):
    stream = ShardStream(_parquet_shards(tmp_path, [37]), seed=0)
    with pytest.raises(ConfigError, match="fewer rows per process than one step's batch"):
        stream_state(0, 38, stream)


# ---- finding and counting shards


def test_list_shards_picks_the_split(tmp_path):
    for name in ("train-00001-of-00002", "train-00000-of-00002", "validation-00000-of-00001"):
        _parquet(tmp_path / "data" / f"{name}.parquet", [0, 1])
    (tmp_path / "README.md").write_text("card")
    assert list_shards(str(tmp_path)) == [str(tmp_path / "data" / f"train-0000{i}-of-00002.parquet") for i in range(2)]
    assert list_shards(str(tmp_path), "validation") == [str(tmp_path / "data" / "validation-00000-of-00001.parquet")]
    with pytest.raises(ConfigError, match="no 'test' split"):
        list_shards(str(tmp_path), "test")


def test_list_shards_split_folders_and_plain_folders(tmp_path):
    _tar(tmp_path / "split" / "train" / "b.tar", [1])
    _tar(tmp_path / "split" / "train" / "a.tar", [0])
    _tar(tmp_path / "split" / "validation" / "c.tar", [2])
    assert list_shards(str(tmp_path / "split")) == [str(tmp_path / "split" / "train" / n) for n in ("a.tar", "b.tar")]
    # Without split names every file, found recursively and sorted, is the train split.
    _parquet(tmp_path / "plain" / "z.parquet", [0])
    _parquet(tmp_path / "plain" / "deep" / "a.parquet", [0])
    assert list_shards(str(tmp_path / "plain")) == [
        str(tmp_path / "plain" / "deep" / "a.parquet"),
        str(tmp_path / "plain" / "z.parquet"),
    ]


def test_list_shards_refuses_empty_mixed_and_missing_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.csv").write_text("a\n1\n")
    with pytest.raises(ConfigError, match=r"empty holds no shards.*\*\.parquet.*\*\.tar"):
        list_shards(str(tmp_path / "empty"))
    _parquet(tmp_path / "mixed" / "a.parquet", [0])
    _tar(tmp_path / "mixed" / "b.tar", [0])
    with pytest.raises(ConfigError, match="mixes parquet and tar"):
        list_shards(str(tmp_path / "mixed"))
    with pytest.raises(MissingError):
        list_shards(str(tmp_path / "nowhere"))


def test_count_rows_reads_footers_and_tar_headers(tmp_path):
    path = _parquet(tmp_path / "a.parquet", list(range(37)))
    assert pq.ParquetFile(path).metadata.num_row_groups == 4
    assert count_rows(path) == 37
    tar_path = tmp_path / "b.tar"
    with tarfile.open(tar_path, "w") as tar:
        _add(tar, "000000.flac", b"f0")
        _add(tar, "000000.json", b'{"description": "rain", "id": 0}')
        _add(tar, "000000.cls", b"3")
        _add(tar, "README", b"no extension: part of no sample")
        _add(tar, "000001.seg.wav", b"f1")
        _add(tar, "000001.txt", "caption é".encode())
        _add(tar, "sub")  # a directory entry
        _add(tar, "sub/000001.flac", b"f2")  # the same stem in a folder is another key
    assert count_rows(str(tar_path)) == 3
    rows = list(ShardStream([str(tar_path)], seed=0, block_rows=1).iter_epoch(0))
    assert rows == [
        {
            "__key__": "000000",
            "audio": {"bytes": b"f0", "path": "000000.flac"},
            "description": "rain",
            "id": 0,
            "cls": "3",
        },
        {"__key__": "000001", "audio": {"bytes": b"f1", "path": "000001.seg.wav"}, "text": "caption é"},
        {"__key__": "sub/000001", "audio": {"bytes": b"f2", "path": "sub/000001.flac"}},
    ]


def test_list_shards_on_the_hub_takes_the_splits_parquet_files(monkeypatch):
    repo = "hf://datasets/owner/sounds@0123abc/data"
    train = [f"{repo}/train-0000{i}-of-00002.parquet" for i in range(2)]
    files = {"train": train, "test": [f"{repo}/test-00000-of-00001.parquet"]}
    builder = SimpleNamespace(config=SimpleNamespace(data_files=files))
    monkeypatch.setattr(datasets, "load_dataset_builder", lambda name: builder)
    assert list_shards("owner/sounds") == train
    with pytest.raises(ConfigError, match=r"no 'validation' split \(its splits: train, test\)"):
        list_shards("owner/sounds", "validation")
    files["train"] = [f"{repo}/train/0000.wav"]
    with pytest.raises(ConfigError, match="no parquet files"):
        list_shards("owner/sounds")


def test_list_shards_names_an_unreachable_hub_id():
    # conftest sets HF_HUB_OFFLINE=1, so resolving any id fails the way a typo or a missing network does.
    with pytest.raises(ConfigError, match="'nobody/no-such-dataset' is neither a local folder"):
        list_shards("nobody/no-such-dataset")


# ---- damaged and oversized webdataset shards


class _CountingFile(io.FileIO):
    """A shard file that adds the bytes read from it to a shared total."""

    read_bytes = 0

    def read(self, size=-1):
        data = super().read(size)
        _CountingFile.read_bytes += len(data)
        return data

    def readinto(self, buffer):
        n = super().readinto(buffer)
        _CountingFile.read_bytes += n or 0
        return n


def _tar_with_video(path: Path, count: int, video_bytes: int) -> str:
    """A shard whose samples carry a large .mp4 member next to the small audio and json ones."""
    with tarfile.open(path, "w") as tar:
        for i in range(count):
            _add(tar, f"{i:06d}.flac", f"flac-{i}".encode())
            _add(tar, f"{i:06d}.mp4", bytes(video_bytes))
            _add(tar, f"{i:06d}.json", json.dumps({"id": i}).encode())
    return str(path)


def test_tar_reads_only_the_members_its_columns_need(tmp_path, monkeypatch):
    import hf_audio_trainer.data.streaming as streaming

    shard = _tar_with_video(tmp_path / "train-00000.tar", count=10, video_bytes=200_000)
    monkeypatch.setattr(streaming, "_open", lambda path: _CountingFile(path, "rb"))
    stream = ShardStream([shard], seed=0, block_rows=4, columns=["audio"])
    _CountingFile.read_bytes = 0
    rows = list(stream.iter_epoch(0))
    assert sorted(r["audio"]["path"] for r in rows) == [f"{i:06d}.flac" for i in range(10)]
    assert all(set(r) == {"audio"} for r in rows)
    # Headers and the 10-byte audio members only: the 2 MB of video is skipped, never read.
    assert _CountingFile.read_bytes < 100_000, _CountingFile.read_bytes
    # A column a json member may hold still reads it (and only then).
    by_id = ShardStream([shard], seed=0, block_rows=4, columns=["id", "audio"])
    assert sorted(r["id"] for r in by_id.iter_epoch(0)) == list(range(10))


def test_a_streamed_training_run_reads_only_the_audio_column(tmp_path, monkeypatch):
    import hf_audio_trainer.data.streaming as streaming
    from hf_audio_trainer.data.streamed import open_stream

    _tar_with_video(tmp_path / "train-00000.tar", count=8, video_bytes=200_000)
    _tar_with_video(tmp_path / "validation-00000.tar", count=2, video_bytes=200_000)
    # the videos are over the cap, but no column reads them: neither split refuses them
    train, validation = open_stream(
        str(tmp_path), "audio", seed=0, rank=0, world=1, validation_rows=2, max_member_bytes=100_000
    )
    assert validation.column_names == ["audio"] and len(validation) == 2
    monkeypatch.setattr(streaming, "_open", lambda path: _CountingFile(path, "rb"))
    _CountingFile.read_bytes = 0
    assert len(list(train.iter_epoch(0))) == 8
    assert _CountingFile.read_bytes < 100_000, _CountingFile.read_bytes


def test_a_tar_member_over_the_size_cap_is_refused_naming_shard_and_member(tmp_path):
    shard = _tar_with_video(tmp_path / "big.tar", count=3, video_bytes=5000)
    with pytest.raises(ConfigError, match=r"member 000000\.mp4 of shard .*big\.tar is 5000 bytes.*max_member_bytes"):
        list(ShardStream([shard], seed=0, max_member_bytes=4096).iter_epoch(0))
    # A member no column reads is never refused: it is not read.
    rows = list(ShardStream([shard], seed=0, max_member_bytes=4096, columns=["audio"]).iter_epoch(0))
    assert len(rows) == 3


def _flip_header_bit(shard: str, member_name: str) -> None:
    """Flip one bit in the header of `member_name` (its name's first byte), as a bad disk or copy would."""
    with tarfile.open(shard) as tar:
        offset = tar.getmember(member_name).offset
    data = bytearray(Path(shard).read_bytes())
    data[offset] ^= 0x01
    Path(shard).write_bytes(bytes(data))


def test_a_tar_with_a_damaged_header_is_refused_naming_the_shard(tmp_path):
    shard = _tar(tmp_path / "shard-00000.tar", list(range(10)))
    _flip_header_bit(shard, "000004.flac")
    # tarfile reads a bad checksum after the first header as the archive's end: 6 of 10 samples would vanish.
    with pytest.raises(ConfigError, match=r"shard .*shard-00000\.tar .*byte \d+ .*after 4 samples"):
        count_rows(shard)
    with pytest.raises(ConfigError, match=r"shard-00000\.tar"):
        ShardStream([shard], seed=0)


def test_a_truncated_tar_is_refused_naming_shard_and_member(tmp_path):
    shard = _tar(tmp_path / "shard-00000.tar", list(range(10)))
    with tarfile.open(shard) as tar:
        member = tar.getmember("000006.json")
    Path(shard).write_bytes(Path(shard).read_bytes()[: member.offset_data + 3])  # cut inside its data
    with pytest.raises(ConfigError, match=r"shard .*shard-00000\.tar is truncated.*000006\.json"):
        count_rows(shard)


def test_tars_joined_end_to_end_are_refused(tmp_path):
    first, second = _tar(tmp_path / "a.tar", [0, 1]), _tar(tmp_path / "b.tar", [2, 3])
    joined = tmp_path / "joined.tar"
    joined.write_bytes(Path(first).read_bytes() + Path(second).read_bytes())
    with pytest.raises(ConfigError, match=r"joined\.tar .*after 2 samples"):
        count_rows(str(joined))


def test_a_tar_without_its_end_marker_warns(tmp_path):
    shard = _tar(tmp_path / "shard-00000.tar", [0, 1, 2])
    with tarfile.open(shard) as tar:
        end = max(m.offset_data + -(-m.size // 512) * 512 for m in tar.getmembers())
    Path(shard).write_bytes(Path(shard).read_bytes()[:end])  # a writer stopped before closing the archive
    with pytest.warns(UserWarning, match=r"shard-00000\.tar ends without"):
        assert count_rows(shard) == 3


def test_a_tar_block_holds_one_sample_of_data_at_a_time(tmp_path):
    import tracemalloc

    path = tmp_path / "tracks.tar"
    with tarfile.open(path, "w") as tar:
        for i in range(32):
            _add(tar, f"{i:06d}.flac", bytes([i]) * 1_000_000)  # 1 MB tracks
    stream = ShardStream([str(path)], seed=0, block_rows=32)
    tracemalloc.start()
    try:
        for row in stream.iter_epoch(0):
            assert len(row["audio"]["bytes"]) == 1_000_000
            del row
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # Reading a whole block of 32 tracks before shuffling it would hold 32 MB; a few tracks' worth is the bound.
    assert peak < 4_000_000, peak
