"""Streamed training data: parquet or webdataset shards split across processes, resumable at any row.

The order is a pure function of (seed, epoch, shard order, offset in shard): each epoch permutes the shards with
``default_rng([seed, epoch])`` and permutes every block of ``block_rows`` consecutive rows of a shard with
``default_rng([seed, epoch, shard, block])``, a reproducible stand-in for a shuffle buffer. A checkpoint therefore
needs only (epoch, row), and resuming reads at most the one block that holds that row, never earlier data.
"""

from __future__ import annotations

import bisect
import itertools
import json
import os
import tarfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import datasets
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from datasets.data_files import get_data_patterns, resolve_pattern

from hf_audio_trainer.errors import ConfigError, MissingError

SHARD_FORMATS = (".parquet", ".tar")
FORMATS_HINT = "parquet files (*.parquet) or webdataset shards (*.tar)"
# webdataset's audio extensions; the first such member of a sample becomes its "audio" column.
TAR_AUDIO_EXTENSIONS = ("wav", "flac", "mp3", "ogg")


def _one_format(files: list[str], where: str) -> list[str]:
    """The files unchanged, or ConfigError when they mix parquet and tar."""
    suffixes = {os.path.splitext(f)[1] for f in files}
    if len(suffixes) > 1:
        raise ConfigError(
            f"{where} mixes parquet and tar shards; keep one format per dataset (convert or move the others)"
        )
    return files


def _local_shards(folder: Path, split: str) -> list[str]:
    """The split's shards of a local folder, split by file or folder names the way `datasets` splits a folder."""
    shards = sorted(
        str(p)
        for p in folder.rglob("*")
        if p.suffix in SHARD_FORMATS and p.is_file() and not any(x.startswith(".") for x in p.relative_to(folder).parts)
    )
    if not shards:
        raise ConfigError(f"folder {folder} holds no shards; the streamed formats are {FORMATS_HINT}")
    _one_format(shards, f"folder {folder}")
    # get_data_patterns gives {"train": ["**"]} when no name marks a split, so a plain folder is all "train".
    patterns = {str(name): value for name, value in get_data_patterns(str(folder)).items()}
    if split not in patterns:
        raise ConfigError(
            f"folder {folder} has no '{split}' split (its splits: {', '.join(patterns)}); pass one of those, or name "
            f"files '{split}-00000.parquet' or put them under '{split}/'"
        )
    matched: set[str] = set()
    for pattern in patterns[split]:
        try:
            matched.update(os.path.realpath(p) for p in resolve_pattern(pattern, str(folder)))
        except FileNotFoundError:  # resolve_pattern's answer to "no match"
            continue
    chosen = [s for s in shards if os.path.realpath(s) in matched]
    if not chosen:
        raise ConfigError(f"folder {folder} has no {FORMATS_HINT} in its '{split}' split; add some or pick a split")
    return chosen


def _hub_shards(name: str, split: str) -> list[str]:
    """The split's parquet (or tar) data files of a Hub dataset, as `datasets` resolves them."""
    try:
        data_files = datasets.load_dataset_builder(name).config.data_files
    except Exception as err:  # offline, unknown id, gated...: all mean the same thing to the user
        raise ConfigError(
            f"dataset '{name}' is neither a local folder of shards nor a resolvable Hub dataset ({err}); "
            f"pass a folder of {FORMATS_HINT} or a Hub id"
        ) from err
    if not data_files or split not in data_files:
        splits = ", ".join(data_files or {}) or "none"
        raise ConfigError(f"Hub dataset '{name}' has no '{split}' split (its splits: {splits}); pass one of those")
    shards = [str(f) for f in data_files[split] if str(f).endswith(SHARD_FORMATS)]
    if not shards:
        raise ConfigError(
            f"Hub dataset '{name}' has no {FORMATS_HINT} for split '{split}'; convert it with "
            "Dataset.push_to_hub (which writes parquet) or use its refs/convert/parquet revision"
        )
    return _one_format(shards, f"Hub dataset '{name}'")


def list_shards(name: str, split: str = "train") -> list[str]:
    """The shard files of a streamed dataset: a local folder of *.parquet / *.tar files or a Hub dataset id."""
    path = Path(name).expanduser()
    if path.is_dir():
        return _local_shards(path, split)
    if path.is_file():
        if path.suffix not in SHARD_FORMATS:
            raise ConfigError(f"dataset file {name} is not a shard; the streamed formats are {FORMATS_HINT}")
        return [str(path)]
    # Hub ids are "name" or "owner/name", so more than one "/" (or a leading ./ ~) means a missing local path.
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise MissingError(f"dataset folder {name} does not exist")
    return _hub_shards(name, split)


def _open(shard: str):
    """A binary file object for a local path or any fsspec URL (hf://...)."""
    return fsspec.open(shard, "rb").open()


def _format(shard: str) -> str:
    suffix = os.path.splitext(shard)[1]
    if suffix not in SHARD_FORMATS:
        raise ConfigError(f"shard {shard} is neither parquet nor tar; the streamed formats are {FORMATS_HINT}")
    return suffix


def _tar_members(tar: tarfile.TarFile) -> Iterator[tuple[int, tarfile.TarInfo, str, str]]:
    """(sample index, member, key, extension) of each sample member, in member order; data is not read.

    webdataset's grouping: key = path up to the first dot of the base name, and a sample is a run of members
    with the same key; members without an extension or hidden ones belong to no sample.
    """
    index, current = -1, None
    while (member := tar.next()) is not None:
        tar.members = []  # TarFile keeps every header it has seen; a large shard would fill memory
        if not member.isfile():
            continue
        directory, _, base = member.name.rpartition("/")
        stem, dot, ext = base.partition(".")
        if not stem or not dot:
            continue
        key = f"{directory}/{stem}" if directory else stem
        if key != current:
            index, current = index + 1, key
        yield index, member, key, ext.lower()


def count_rows(shard: str) -> int:
    """Rows of one shard: parquet from its footer, tar from the sample keys in its member headers."""
    with _open(shard) as f:
        if _format(shard) == ".parquet":
            return pq.ParquetFile(f).metadata.num_rows
        with tarfile.open(fileobj=f, mode="r:") as tar:
            return 1 + max((index for index, *_ in _tar_members(tar)), default=-1)


def _tar_row(key: str, members: list[tuple[str, str, bytes]]) -> dict:
    """One webdataset sample as a row: audio as {"bytes", "path"}, .json fields merged, .txt as "text"."""
    row: dict = {"__key__": key}
    fields: dict = {}
    for name, ext, data in members:
        if ext.rsplit(".", 1)[-1] in TAR_AUDIO_EXTENSIONS:
            row["audio" if "audio" not in row else ext] = {"bytes": data, "path": name}
        elif ext == "json":
            parsed = json.loads(data)
            if isinstance(parsed, dict):
                fields.update(parsed)
            else:
                row["json"] = parsed
        elif ext == "txt":
            row["text"] = data.decode("utf-8")
        else:
            try:
                row[ext] = data.decode("utf-8")
            except UnicodeDecodeError:  # a binary member (.npy, .png ...): keep its bytes
                row[ext] = data
    # Members win over json fields so a stray "audio" or "__key__" in the metadata cannot hide them.
    return {**fields, **row}


def _take(block: pa.Table | list[dict], indices: np.ndarray) -> list[dict]:
    """The block's rows at `indices` as dicts; a parquet block converts only those rows to Python."""
    if isinstance(block, pa.Table):
        return block.take(pa.array(indices, type=pa.int64())).to_pylist()
    return [block[i] for i in indices]


class ShardStream:
    """One process's rows of a list of shards, per epoch, resumable at any row without replaying data."""

    def __init__(
        self,
        shards: list[str],
        seed: int,
        rank: int = 0,
        world: int = 1,
        block_rows: int = 256,
        columns: list[str] | None = None,
    ) -> None:
        if not shards:
            raise ConfigError(f"no shards to stream; pass a folder or Hub dataset with {FORMATS_HINT}")
        if world < 1 or not 0 <= rank < world:
            raise ConfigError(f"process rank {rank} of {world} processes is impossible; need 0 <= rank < world")
        if block_rows < 1:
            raise ConfigError(f"block_rows={block_rows} must be at least 1")
        if seed < 0:
            raise ConfigError(f"seed={seed} must be non-negative for the stream's order")
        self.shards, self.seed, self.rank, self.world = list(shards), seed, rank, world
        self.block_rows, self.columns = block_rows, columns
        self.rows = [count_rows(s) for s in self.shards]
        # Rows decoded since construction (whole row groups of parquet, samples whose data was read of tar): the
        # cost of a resume, which tests bound.
        self.rows_read = 0
        if columns is not None and _format(self.shards[0]) == ".parquet":
            with _open(self.shards[0]) as f:
                names = pq.ParquetFile(f).schema_arrow.names
            if missing := [c for c in columns if c not in names]:
                raise ConfigError(f"columns {missing} are not in shard {self.shards[0]} (it has {names}); fix columns")
        self.sharded = len(self.shards) % world == 0
        if not self.sharded:
            warnings.warn(
                f"{len(self.shards)} shards do not divide among {world} processes, so every process reads every "
                f"shard and keeps every {world}-th row (slower: each process reads all the data); re-shard the "
                f"dataset into a multiple of {world} shards",
                stacklevel=2,
            )

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))

    def epoch_shards(self, epoch: int) -> list[int]:
        """This rank's shard indices for an epoch, in reading order."""
        order = self._permutation(epoch)
        return [int(i) for i in (order[self.rank :: self.world] if self.sharded else order)]

    def rows_per_rank(self, epoch: int) -> int:
        """Rows every rank yields in this epoch: the minimum over ranks, the same on all of them without talking."""
        if not self.sharded:
            return sum(self.rows) // self.world
        order = self._permutation(epoch)
        # A rank with more rows would run collectives the others never join, so all stop at the smallest; the rows
        # it drops come back in other epochs, whose permutations hand it other shards.
        return min(sum(self.rows[i] for i in order[r :: self.world]) for r in range(self.world))

    def iter_epoch(self, epoch: int, start: int = 0) -> Iterator[dict]:
        """This rank's rows of `epoch` from its `start`-th on: exactly rows_per_rank(epoch) - start of them."""
        total = self.rows_per_rank(epoch)
        if not 0 <= start <= total:
            raise ConfigError(
                f"stream position {start} is outside epoch {epoch}'s {total} rows per process; resume with the "
                "same shards, seed and number of processes as the checkpoint"
            )
        # Positions count rows of this rank's shard sequence; without sharding a rank keeps every world-th one.
        stride = 1 if self.sharded else self.world
        first = start if self.sharded else start * self.world + self.rank
        return self._rows(epoch, first, stride, total - start)

    def _rows(self, epoch: int, position: int, stride: int, count: int) -> Iterator[dict]:
        """`count` rows at positions position, position + stride ... of this rank's shard sequence."""
        offset = 0  # position of the current shard's first row
        for shard in self.epoch_shards(epoch):
            n = self.rows[shard]
            if count == 0:
                return
            if position >= offset + n:  # a whole shard before the resume point: skipped by its count alone
                offset += n
                continue
            for block_index, block in self._blocks(shard, (position - offset) // self.block_rows):
                size = len(block)
                block_start = offset + block_index * self.block_rows
                wanted = np.arange(position - block_start, size, stride)[:count]
                if len(wanted):
                    order = np.random.default_rng([self.seed, epoch, shard, block_index]).permutation(size)
                    yield from _take(block, order[wanted])
                    position, count = position + len(wanted) * stride, count - len(wanted)
                if count == 0:
                    return
            offset += n

    def _blocks(self, shard: int, first_block: int) -> Iterator[tuple[int, pa.Table | list[dict]]]:
        """(block index, rows) of a shard from block `first_block` to its end."""
        if _format(self.shards[shard]) == ".parquet":
            return self._parquet_blocks(shard, first_block)
        return self._tar_blocks(shard, first_block)

    def _parquet_blocks(self, shard: int, first_block: int) -> Iterator[tuple[int, pa.Table]]:
        with _open(self.shards[shard]) as f:
            parquet = pq.ParquetFile(f)
            meta = parquet.metadata
            starts = np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]).tolist()
            # Start at the row group holding the block: row groups are the smallest unit parquet can read.
            group = bisect.bisect_right(starts, first_block * self.block_rows) - 1
            buffer, buffer_start = None, starts[group]
            for block in range(first_block, -(-self.rows[shard] // self.block_rows)):
                lo, hi = block * self.block_rows, min(self.rows[shard], (block + 1) * self.block_rows)
                while buffer is None or buffer_start + buffer.num_rows < hi:
                    table = parquet.read_row_group(group, columns=self.columns, use_threads=False)
                    self.rows_read += table.num_rows
                    buffer = table if buffer is None else pa.concat_tables([buffer, table])
                    group += 1
                yield block, buffer.slice(lo - buffer_start, hi - lo)
                buffer, buffer_start = buffer.slice(hi - buffer_start), hi

    def _tar_blocks(self, shard: int, first_block: int) -> Iterator[tuple[int, list[dict]]]:
        first_row = first_block * self.block_rows
        block, block_index = [], first_block
        sample: tuple[int, str, list] | None = None
        with _open(self.shards[shard]) as f, tarfile.open(fileobj=f, mode="r:") as tar:
            # A tar cannot seek to a sample, but skipping one reads only its headers, never its data.
            # A sentinel after the last member flushes the last sample.
            for index, member, key, ext in itertools.chain(_tar_members(tar), [(None, None, None, None)]):
                if index is not None and index < first_row:
                    continue
                if sample is not None and index != sample[0]:
                    block.append(self._tar_row(sample[1], sample[2]))
                    if len(block) == self.block_rows:
                        yield block_index, block
                        block, block_index = [], block_index + 1
                if index is None:
                    break
                if sample is None or index != sample[0]:
                    sample = (index, key, [])
                sample[2].append((member.name, ext, tar.extractfile(member).read()))
        if block:
            yield block_index, block

    def _tar_row(self, key: str, members: list[tuple[str, str, bytes]]) -> dict:
        self.rows_read += 1
        row = _tar_row(key, members)
        return row if self.columns is None else {c: row[c] for c in self.columns if c in row}


def steps_in_epoch(stream: ShardStream, epoch: int, rows_per_step: int) -> int:
    """Optimizer steps in an epoch when each takes `rows_per_step` rows per process; a partial tail is dropped."""
    if rows_per_step < 1:
        raise ConfigError(f"rows_per_step={rows_per_step} must be at least 1")
    rows = stream.rows_per_rank(epoch)
    if rows < rows_per_step:
        raise ConfigError(
            f"the streamed dataset has fewer rows per process than one step's batch (epoch {epoch}: {rows} rows per "
            f"process, {rows_per_step} per step); use a smaller batch, fewer processes or more data"
        )
    return rows // rows_per_step


def stream_state(step: int, rows_per_step: int, stream: ShardStream) -> tuple[int, int]:
    """(epoch, start row) of this rank after `step` optimizer steps of `rows_per_step` rows per process each."""
    if step < 0:
        raise ConfigError(f"step={step} must be non-negative")
    epoch = 0
    # Epochs can differ in length (each permutation hands ranks other shards), so walk them; it is arithmetic only.
    while step >= (steps := steps_in_epoch(stream, epoch, rows_per_step)):
        step, epoch = step - steps, epoch + 1
    return epoch, step * rows_per_step
