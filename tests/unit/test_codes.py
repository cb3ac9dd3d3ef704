import numpy as np
import torch

from hf_audio_trainer.data.codes import CodesCollator, delay_pattern

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
