import numpy as np
import pytest
import torch
from datasets import Dataset

from hf_audio_trainer.data.codes import CodesCollator, delay_pattern, eval_batches

PAD = 9


def test_delay_pattern_shifts_codebook_k_by_k_frames():
    codes = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 0]])
    expected = np.array(
        [
            [1, 2, 3, PAD, PAD],
            [PAD, 4, 5, 6, PAD],
            [PAD, PAD, 7, 8, 0],
        ]
    )
    np.testing.assert_array_equal(delay_pattern(codes, PAD), expected)


def test_collator_shifts_inputs_masks_labels_and_counts_targets():
    collate = CodesCollator(num_codebooks=2, pad_id=PAD, bos_id=PAD, frame_rate=50.0)
    long = {"codes": [[1, 2, 3], [4, 5, 6]]}
    short = {"codes": [[7], [8]]}
    batch = collate([long, short])
    # delayed long clip: [[1,2,3,P],[P,4,5,6]]; input = BOS then delayed[:, :-1]
    input_ids = batch["input_ids"].view(2, 2, -1)
    labels = batch["labels"].view(2, 2, -1)
    np.testing.assert_array_equal(input_ids[0].numpy(), [[PAD, 1, 2, 3], [PAD, PAD, 4, 5]])
    np.testing.assert_array_equal(labels[0].numpy(), [[1, 2, 3, -100], [-100, 4, 5, 6]])
    # short clip: delayed [[7,P],[P,8]], padded to length 4
    np.testing.assert_array_equal(input_ids[1].numpy(), [[PAD, 7, PAD, PAD], [PAD, PAD, PAD, PAD]])
    np.testing.assert_array_equal(labels[1].numpy(), [[7, -100, -100, -100], [-100, 8, -100, -100]])
    np.testing.assert_array_equal(batch["attention_mask"].numpy(), [[1, 1, 1, 1], [1, 1, 0, 0]])
    # every clip contributes codebooks x frames targets, and exactly those are unmasked
    assert batch["num_items"] == 2 * 3 + 2 * 1 == int((batch["labels"] != -100).sum())
    assert batch["num_samples"] == 2
    assert batch["audio_seconds"] == 4 / 50.0
    assert batch["input_ids"].dtype == torch.long


def numbered_rows(num_rows: int) -> Dataset:
    return Dataset.from_dict({"codes": [[[i]] for i in range(num_rows)]})


def list_rows(examples: list[dict]) -> dict:
    """A collator that keeps the rows' numbers, counting one item per row."""
    n = len(examples)
    return {"rows": [ex["codes"][0][0] for ex in examples], "num_items": n, "num_samples": n, "audio_seconds": n / 2}


# (rows, processes, batch size, padding batches): 100 rows on 8 ranks in batches of 4 split as [4,4,4,4,3,3,3,3]
# batches; the sharded tests' 3 rows on 2 ranks in batches of 1 as [2,1]; a single row leaves rank 1 with none
@pytest.mark.parametrize("num_rows, world, batch_size, num_padding", [(100, 8, 4, 4), (3, 2, 1, 1), (1, 2, 1, 1),
                                                                      (8, 2, 4, 0), (5, 1, 2, 0)])  # fmt: skip
def test_every_rank_runs_as_many_eval_batches_and_padding_counts_nothing(num_rows, world, batch_size, num_padding):
    per_rank = [list(eval_batches(numbered_rows(num_rows), batch_size, list_rows, r, world)) for r in range(world)]
    # under FSDP2 and ZeRO-3 each batch's forward is a collective: a rank with fewer would leave the others waiting
    assert len({len(batches) for batches in per_rank}) == 1, [len(batches) for batches in per_rank]
    real = [b for batches in per_rank for b in batches if not b.get("padding")]
    padding = [b for batches in per_rank for b in batches if b.get("padding")]
    assert sorted(row for b in real for row in b["rows"]) == list(range(num_rows))  # every row once, as before
    assert len(padding) == num_padding
    for b in padding:  # a real row, so the forward is a real one, that weighs nothing
        assert b["rows"] and b["num_items"] == b["num_samples"] == b["audio_seconds"] == 0
