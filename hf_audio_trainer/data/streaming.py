"""Streamed training data: parquet or webdataset shards split across processes, resumable at any row.

The order is a pure function of (seed, epoch, shard order, offset in shard): each epoch permutes the shards with
``default_rng([seed, epoch])`` and permutes every block of ``block_rows`` consecutive rows of a shard with
``default_rng([seed, epoch, shard, block])``, a reproducible stand-in for a shuffle buffer. A checkpoint therefore
needs only (epoch, row), and resuming reads at most the one block that holds that row, never earlier data.
"""

from __future__ import annotations

import bisect
import functools
import json
import os
import tarfile
import warnings
from collections.abc import Callable, Iterator
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
# The default cap on one tar member's bytes: a guard against a stray huge file (a sample's data is held in memory).
MAX_MEMBER_BYTES = 1 << 30
# Zero bytes allowed after tar's end-of-archive marker: writers pad to their record size (10 KiB for tarfile and GNU
# tar; larger blocking factors stay far below this).
END_PADDING = 1 << 20


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


def _size(f) -> int:
    """The file's length in bytes (its physical end, which a whole tar archive reaches)."""
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(0)
    return size


def _open_tar(f, shard: str) -> tarfile.TarFile:
    try:
        return tarfile.open(fileobj=f, mode="r:")
    except tarfile.TarError as err:
        raise ConfigError(f"shard {shard} is not a readable tar archive ({err}); re-create it or remove it") from None


def _tar_samples(tar: tarfile.TarFile, shard: str, size: int) -> Iterator[tuple[int, str, list]]:
    """(sample index, key, [(member, extension)]) of each sample, in member order, from the headers alone.

    webdataset's grouping: key = path up to the first dot of the base name, and a sample is a run of members
    with the same key; members without an extension or hidden ones belong to no sample. An archive that stops
    before the file does is refused (tarfile reads a damaged header as the end, which would drop the rest).
    """
    index, current, members, last = -1, None, [], None
    while True:
        try:
            member = tar.next()
        except tarfile.TarError as err:  # a header past the file's end, a damaged extended header
            after = f" after member {last.name}" if last is not None else ""
            raise ConfigError(
                f"shard {shard} is truncated or damaged{after} ({err}); re-create it or remove it from the dataset"
            ) from None
        if member is None:
            break
        tar.members = []  # TarFile keeps every header it has seen; a large shard would fill memory
        last = member
        if member.offset_data + member.size > size:
            raise ConfigError(
                f"shard {shard} is truncated: member {member.name} needs bytes up to {member.offset_data + member.size}"
                f" and the file has {size}; re-create it or remove it from the dataset"
            )
        if not member.isfile():
            continue
        directory, _, base = member.name.rpartition("/")
        stem, dot, ext = base.partition(".")
        if not stem or not dot:
            continue
        key = f"{directory}/{stem}" if directory else stem
        if key != current:
            if members:
                yield index, current, members
            index, current, members = index + 1, key, []
        members.append((member, ext.lower()))
    if members:
        yield index, current, members
    _check_end(tar, shard, size, index + 1)


def _check_end(tar: tarfile.TarFile, shard: str, size: int, samples: int) -> None:
    """Refuse a shard whose archive stops before its physical end; warn when it lacks the end-of-archive marker."""
    end = tar.offset  # where tarfile stopped: its end-of-archive marker, or a header it could not read
    if end >= size:
        warnings.warn(
            f"shard {shard} ends without tar's end-of-archive marker: its writer may have stopped early, so samples "
            f"after its {samples} may be missing; re-create it to be sure",
            stacklevel=2,
        )
        return
    tar.fileobj.seek(end)
    tail = tar.fileobj.read(min(size - end, END_PADDING))
    if size - end > END_PADDING or tail.strip(b"\0"):
        raise ConfigError(
            f"shard {shard} cannot be read past byte {end} of its {size}, after {samples} samples (a damaged header, "
            "or tar files joined end to end), so the rest would be dropped; re-create it or remove it from the dataset"
        )


def _member_columns(extensions: list[str]) -> list[str | None]:
    """The column each member of a sample fills: the first audio member "audio" (later ones their extension), .txt
    "text", any other its extension; None for .json, whose fields are known only once it is read."""
    columns, taken = [], {"__key__"}
    for ext in extensions:
        if ext.rsplit(".", 1)[-1] in TAR_AUDIO_EXTENSIONS:
            column = ext if "audio" in taken else "audio"
        else:
            column = {"json": None, "txt": "text"}.get(ext, ext)
        columns.append(column)
        taken.add(column)
    return columns


def _needed(members: list, columns: list[str] | None) -> list[tuple[tarfile.TarInfo, str, str | None]]:
    """(member, extension, column) of the members a row with `columns` (None: all) reads."""
    named = [(m, ext, c) for (m, ext), c in zip(members, _member_columns([e for _, e in members]), strict=True)]
    if columns is None:
        return named
    wanted = set(columns) - {"__key__"}
    # a .json member is read only for a column no other member of the sample fills (members win over its fields)
    json_wanted = bool(wanted - {c for *_, c in named})
    return [(m, ext, c) for m, ext, c in named if (c in wanted if c is not None else json_wanted)]


def _check_size(member: tarfile.TarInfo, shard: str, max_member_bytes: int | None) -> None:
    if max_member_bytes is not None and member.size > max_member_bytes:
        raise ConfigError(
            f"member {member.name} of shard {shard} is {member.size} bytes, over max_member_bytes={max_member_bytes} "
            "(raise --streaming_max_member_mb, or remove the member from the shard)"
        )


def count_rows(shard: str, columns: list[str] | None = None, max_member_bytes: int | None = None) -> int:
    """Rows of one shard: parquet from its footer, tar from the sample keys in its member headers (refusing a
    damaged or truncated archive, and a member that `columns` read over `max_member_bytes`)."""
    with _open(shard) as f:
        if _format(shard) == ".parquet":
            return pq.ParquetFile(f).metadata.num_rows
        size = _size(f)
        with _open_tar(f, shard) as tar:
            rows = 0
            for _, _, members in _tar_samples(tar, shard, size):
                for member, *_ in _needed(members, columns):
                    _check_size(member, shard, max_member_bytes)
                rows += 1
            return rows


def _tar_row(key: str, members: list[tuple[str, str, str | None, bytes]]) -> dict:
    """One webdataset sample as a row from its (name, extension, column, data) members: audio as {"bytes",
    "path"}, .json fields merged, .txt as "text"."""
    row: dict = {"__key__": key}
    fields: dict = {}
    for name, ext, column, data in members:
        if column is None:
            parsed = json.loads(data)
            if isinstance(parsed, dict):
                fields.update(parsed)
            else:
                row["json"] = parsed
        elif ext.rsplit(".", 1)[-1] in TAR_AUDIO_EXTENSIONS:
            row[column] = {"bytes": data, "path": name}
        elif ext == "txt":
            row[column] = data.decode("utf-8")
        else:
            try:
                row[column] = data.decode("utf-8")
            except UnicodeDecodeError:  # a binary member (.npy, .png ...): keep its bytes
                row[column] = data
    # Members win over json fields so a stray "audio" or "__key__" in the metadata cannot hide them.
    return {**fields, **row}


def _take(block: pa.Table | list[Callable[[], dict]], indices: np.ndarray) -> Iterator[dict]:
    """The block's rows at `indices` as dicts; a parquet block converts only those rows to Python, a tar block
    reads each row's data as it is taken."""
    if isinstance(block, pa.Table):
        return iter(block.take(pa.array(indices, type=pa.int64())).to_pylist())
    return (block[i]() for i in indices)


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
        max_member_bytes: int | None = MAX_MEMBER_BYTES,
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
        self.block_rows, self.columns, self.max_member_bytes = block_rows, columns, max_member_bytes
        # counting reads every tar header, so a damaged shard or an oversized member is refused before training
        self.rows = [count_rows(s, columns, max_member_bytes) for s in self.shards]
        # Rows decoded since construction (whole row groups of parquet, samples whose data was read of tar): the
        # cost of a resume, which tests bound.
        self.rows_read = 0
        if columns is not None and _format(self.shards[0]) == ".parquet":
            with _open(self.shards[0]) as f:
                names = pq.ParquetFile(f).schema_arrow.names
            if missing := [c for c in columns if c not in names]:
                raise ConfigError(
                    f"columns {missing} are not in shard {self.shards[0]} (it has {names}); name one of those "
                    "(--audio_column for the audio)"
                )
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

    def _tar_blocks(self, shard: int, first_block: int) -> Iterator[tuple[int, list[Callable[[], dict]]]]:
        """(block index, row readers) of a tar shard from block `first_block` on: a block holds its samples'
        headers, and a sample's data is read when the shuffle takes it, so memory holds one sample, not a block."""
        path = self.shards[shard]
        first_row = first_block * self.block_rows
        block, block_index = [], first_block
        with _open(path) as f:
            size = _size(f)
            with _open_tar(f, path) as tar:
                # A tar cannot seek to a sample, but skipping one reads only its headers, never its data.
                for index, key, members in _tar_samples(tar, path, size):
                    if index < first_row:
                        continue
                    block.append(functools.partial(self._read_row, tar, path, key, _needed(members, self.columns)))
                    if len(block) == self.block_rows:
                        yield block_index, block
                        block, block_index = [], block_index + 1
                if block:
                    yield block_index, block

    def _read_row(self, tar: tarfile.TarFile, shard: str, key: str, members: list) -> dict:
        self.rows_read += 1
        read = []
        for member, ext, column in members:
            _check_size(member, shard, self.max_member_bytes)
            try:
                data = tar.extractfile(member).read()
            except tarfile.TarError as err:  # the shard changed since it was counted
                raise ConfigError(
                    f"member {member.name} of shard {shard} cannot be read ({err}); re-create it"
                ) from None
            read.append((member.name, ext, column, data))
        try:
            row = _tar_row(key, read)
        except ValueError as err:  # a .json or .txt member that does not parse
            raise ConfigError(
                f"sample {key} of shard {shard} has a member that does not parse ({err}); fix it"
            ) from None
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
