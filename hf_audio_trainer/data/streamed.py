"""Training on a stream (`--streaming`): shards read as they are needed, tokenized a micro-batch at a time on the
accelerator, never stored whole; the position is the step, so resuming seeks instead of replaying.

Every rank reads its own shards (`data.streaming.ShardStream`), and every epoch holds the same number of steps on
every rank (the fewest rows any rank has, divided by a step's rows), so an uneven last shard can never leave one
rank in a collective the others do not join. The difficulty curriculum needs every clip's score before it can
order them, which a stream does not have: `--curriculum` with `--streaming` is refused (a curriculum over a stream
would mean shards grouped by difficulty, read in order; not built).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import datasets

from hf_audio_trainer.codecs import AudioTokenizer
from hf_audio_trainer.data.audio import decode_audio
from hf_audio_trainer.data.preprocess import encode_waves
from hf_audio_trainer.data.segments import window_start
from hf_audio_trainer.data.streaming import (
    MAX_MEMBER_BYTES,
    TAR_AUDIO_EXTENSIONS,
    ShardStream,
    list_shards,
    stream_state,
)
from hf_audio_trainer.errors import ConfigError


class StreamPlan:
    """What the stage needs of a sampler for a stream: steps per epoch, and the data position of a step."""

    def __init__(self, stream: ShardStream, rows_per_step: int):
        self.stream, self.rows_per_step = stream, rows_per_step
        self.steps_per_epoch = stream.rows_per_rank(0) // rows_per_step
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"the stream has {stream.rows_per_rank(0)} rows per process, fewer than one step's "
                f"{rows_per_step} (per-device batch x accumulation); use a smaller batch or fewer processes"
            )

    def state_at_step(self, step: int) -> dict[str, int]:
        epoch, row = stream_state(step, self.rows_per_step, self.stream)
        return {"epoch": epoch, "row": row, "seed": self.stream.seed}


def open_stream(
    name: str,
    audio_column: str,
    seed: int,
    rank: int,
    world: int,
    validation_rows: int,
    max_member_bytes: int | None = MAX_MEMBER_BYTES,
):
    """This rank's training stream of a shard folder or Hub dataset, and the first `validation_rows` rows of its
    validation split as a (small, in-memory) Dataset. `max_member_bytes` caps one webdataset member's size."""
    # A streamed run reads only the audio (what needs other columns, text or the curriculum's scores, does not
    # stream): a webdataset sample's other members (video, stems, metadata) are skipped, never read.
    columns = [audio_column]
    stream = ShardStream(
        list_shards(name, "train"), seed=seed, rank=rank, world=world, columns=columns,
        max_member_bytes=max_member_bytes,
    )  # fmt: skip
    try:
        validation_shards = list_shards(name, "validation")
    except ConfigError as err:
        raise ConfigError(
            f"--streaming needs a validation split beside the training shards ({err}); add validation-*.parquet "
            "(or a validation/ folder of shards)"
        ) from None
    rows = []
    for shard in validation_shards:
        # one shard, one process: just its rows
        for row in ShardStream([shard], seed=seed, columns=columns, max_member_bytes=max_member_bytes).iter_epoch(0):
            rows.append(row)
            if len(rows) == validation_rows:
                break
        if len(rows) == validation_rows:
            break
    if not rows:
        raise ConfigError(f"the validation split of {name} has no rows; add some")
    if audio_column not in rows[0]:
        raise ConfigError(
            f"the validation rows of {name} have no column '{audio_column}' (a webdataset sample's first "
            f"{'/'.join(TAR_AUDIO_EXTENSIONS)} member is its 'audio'); pass --audio_column or add the audio"
        )
    # {"bytes", "path"} structs, read as undecoded Audio like every other split (a cast of the Arrow storage)
    validation = datasets.Dataset.from_list(rows).cast_column(audio_column, datasets.Audio(decode=False))
    return stream, validation


def first_rows(stream: ShardStream, count: int, audio_column: str) -> datasets.Dataset:
    """The first `count` rows of epoch 0 (e.g. to fit a tokenizer on)."""
    rows = []
    for row in stream.iter_epoch(0):
        rows.append({audio_column: row[audio_column]})
        if len(rows) == count:
            break
    return datasets.Dataset.from_list(rows).cast_column(audio_column, datasets.Audio(decode=False))


def streamed_batches(
    plan: StreamPlan,
    tokenizer: AudioTokenizer,
    collate: Callable[[list[dict]], dict],
    micro_batch_size: int,
    start_step: int,
    audio_column: str,
    segment_frames: int,
    max_duration_seconds: float | None,
) -> Iterator[dict]:
    """Endless micro-batches of this rank from optimizer step `start_step` on: rows decoded, encoded together on
    the tokenizer's device, each cut to its window (a pure function of seed, epoch and position)."""
    stream, per_step = plan.stream, plan.rows_per_step
    epoch, start = stream_state(start_step, per_step, stream)
    max_samples = None if max_duration_seconds is None else int(max_duration_seconds * tokenizer.sample_rate)
    hop = tokenizer.hop_length
    while True:
        limit = stream.rows_per_rank(epoch) // per_step * per_step  # whole steps only, the same on every rank
        position, pending = start, []
        rows = stream.iter_epoch(epoch, start)
        for row in rows:
            if position >= limit:
                break
            wave = decode_audio(row[audio_column], tokenizer.sample_rate, where=f"streamed row {position}")
            wave = wave[:max_samples] if max_samples else wave
            # the window is cut from the audio before encoding: a 3-minute track costs one window's codec work
            where = position * stream.world + stream.rank  # a position no other rank has
            first = window_start(stream.seed, epoch, where, tokenizer.num_frames(len(wave)), segment_frames)
            pending.append(wave[first * hop : (first + segment_frames) * hop])
            position += 1
            if len(pending) == micro_batch_size:
                codes = encode_waves(tokenizer, pending)
                if any(c.shape[1] == 0 for c in codes):
                    raise ConfigError(
                        f"a streamed clip before row {position} of epoch {epoch} is shorter than one tokenizer "
                        "frame; remove it from the shards"
                    )
                yield collate([{"codes": c[:, :segment_frames].tolist()} for c in codes])
                pending = []
        rows.close()
        epoch, start = epoch + 1, 0
