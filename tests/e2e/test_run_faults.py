"""The faults of a long real run (issue 24): torn metrics lines, Hub uploads slower than saves or cut short by a stop,
a token on the command line, a lock on a filesystem shared by several machines."""

import json

import pytest

from hf_audio_trainer import pretrain
from hf_audio_trainer.trackers import METRICS_FILE, read_metrics
from tests.helpers import fit_small_tokenizer, quick_run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return fit_small_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def settings(tokenizer, out, **overrides):
    return quick_run(tokenizer, out, **{"model_size": "micro", "max_steps": 4, "save_steps": 2, **overrides})


def test_a_torn_metrics_line_neither_blocks_the_resume_nor_the_summary(tokenizer, tmp_path):
    out = tmp_path / "run"
    pretrain(settings(tokenizer, out))
    with open(out / METRICS_FILE, "ab") as f:  # the disk filled up in the middle of a line, then the node died
        f.write(b'{"step": 5, "time": 1.0, "train/lo' + b"\0" * 64)
    result = pretrain(settings(tokenizer, out, max_steps=6, resume_from_checkpoint="latest"))
    assert result.global_step == 6
    lines = (out / METRICS_FILE).read_bytes().split(b"\n")
    assert lines[-1] == b"" and all(json.loads(line) for line in lines[:-1])  # the resume cleaned the file
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4, 5, 6]
