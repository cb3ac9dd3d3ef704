"""Run under `accelerate launch` by test_ddp_data.py: each rank preprocesses the same clips, counting what it encodes.

Usage: preprocess_on_ranks.py TOKENIZER OUT SHARED (1: one cache folder for all ranks; 0: one per rank, as nodes
without a shared filesystem have). Writes OUT/rank{R}.json: world size, clips this rank encoded, rows, codes hash.
"""

import hashlib
import json
import os
import sys

from accelerate import Accelerator

from hf_audio_trainer.codecs import load_audio_tokenizer
from hf_audio_trainer.data.preprocess import encode_dataset
from hf_audio_trainer.data.synthetic import make_synthetic_dataset

ROWS, CHUNK = 40, 8


class Counting:
    """The tokenizer, counting the clips it encodes."""

    def __init__(self, inner):
        self.inner, self.clips = inner, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def encoder_on(self, device):
        return self

    def encode_batch(self, waves):
        self.clips += len(waves)
        return self.inner.encode_batch(waves)


def main(tokenizer_folder: str, out: str, shared: bool) -> None:
    acc = Accelerator()
    clips = make_synthetic_dataset(num_clips=ROWS + 2, validation_fraction=0.05, seed=3)["train"]
    assert len(clips) == ROWS
    counted = Counting(load_audio_tokenizer(tokenizer_folder))
    cache = os.path.join(out, "cache" if shared else f"cache{acc.process_index}")
    codes = list(encode_dataset(clips, counted, acc, cache_dir=cache, chunk_rows=CHUNK)["codes"])
    record = {"world": acc.num_processes, "clips": counted.clips, "rows": len(codes)}
    record["hash"] = hashlib.sha256(json.dumps(codes).encode()).hexdigest()
    with open(os.path.join(out, f"rank{acc.process_index}.json"), "w") as f:
        json.dump(record, f)
    acc.end_training()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3] == "1")
