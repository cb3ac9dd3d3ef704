"""Text conditions in batches (data/text.py): cached states stored as float32, token ids padded with the null rows
masked, condition dropout from the data position, and preference pairs as 2B conditioned sequences."""

import datasets
import numpy as np
import torch

from hf_audio_trainer.data.codes import CodesCollator
from hf_audio_trainer.data.text import STATES, TextCollator, TextPairCollator, add_states, dropped

CODES = CodesCollator(num_codebooks=2, pad_id=8, bos_id=8, frame_rate=50.0)


def test_states_are_stored_as_float32_rows_of_their_own_length():
    states = [np.arange(6, dtype=np.float32).reshape(3, 2) / 7, np.zeros((0, 2), dtype=np.float32)]
    ds = add_states(datasets.Dataset.from_dict({"x": [0, 1]}), states)
    assert ds.features[STATES] == datasets.List(datasets.List(datasets.Value("float32")))
    np.testing.assert_array_equal(np.asarray(ds[0][STATES], dtype=np.float32), states[0])  # no float64 rounding
    assert ds[1][STATES] == []


def test_token_ids_are_padded_and_dropped_rows_get_the_null_condition():
    rows = [{"codes": [[1, 2, 3], [4, 5, 6]], "text_ids": [5, 6, 7], "row": r, "epoch": 0} for r in range(40)] + [
        {"codes": [[1], [2]], "text_ids": [], "row": 40, "epoch": 0}
    ]  # a row without text
    batch = TextCollator(CODES, cached=False, dropout=0.5, seed=3)(rows)
    expected_null = [dropped(3, 0, r, 0.5) for r in range(40)] + [True]
    assert batch["text_ids"].shape == (41, 3) and batch["text_mask"].shape == (41, 3)
    assert batch["text_mask"].sum(1).tolist() == [0 if n else 3 for n in expected_null]
    assert torch.equal(
        batch["text_ids"][~torch.tensor(expected_null)], torch.tensor([[5, 6, 7]] * (41 - sum(expected_null)))
    )
    assert batch["sample_stats"]["null_condition"] == sum(expected_null)
    assert 5 < sum(expected_null) < 36  # about half of 40 (+1): the dropout is real
    # evaluation rows carry no position: nothing is dropped
    plain = [{k: v for k, v in r.items() if k not in ("row", "epoch")} for r in rows[:40]]
    assert TextCollator(CODES, cached=False, dropout=0.5)(plain)["text_mask"].sum() == 120


def test_pairs_become_chosen_then_rejected_sequences_each_with_its_prompt():
    rows = [
        {"chosen_codes": [[1, 2], [3, 4]], "rejected_codes": [[1, 1, 1], [2, 2, 2]],
         STATES: np.full((2, 4), i + 1.0).tolist(), "ref_chosen_logps": -1.0 - i, "ref_rejected_logps": -2.0 - i}
        for i in range(3)
    ]  # fmt: skip
    batch = TextPairCollator(CODES)(rows)
    assert batch["num_items"] == batch["num_samples"] == 3
    assert batch["input_ids"].shape[0] == 6 * 2  # 2B sequences x 2 codebooks
    assert batch["response_tokens"].tolist() == [4.0, 4.0, 4.0, 6.0, 6.0, 6.0]
    # sequence s (chosen 0-2, rejected 3-5) is conditioned on pair s % 3's prompt
    assert batch["encoder_states"][:, 0, 0].tolist() == [1.0, 2.0, 3.0, 1.0, 2.0, 3.0]
    assert batch["ref_chosen_logps"].tolist() == [-1.0, -2.0, -3.0]
    assert "sample_stats" not in batch
