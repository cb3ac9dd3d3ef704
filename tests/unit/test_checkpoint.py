import json

import pytest

from hf_audio_trainer import checkpoint as ckpt


def make(root, step, complete=True):
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    if complete:
        (folder / ckpt.STATE_FILE).write_text(json.dumps({"global_step": step}))
    return folder


def test_latest_is_the_highest_complete_checkpoint(tmp_path):
    make(tmp_path, 5)
    make(tmp_path, 20)
    make(tmp_path, 100, complete=False)  # a crash mid-write never gets the state file
    (tmp_path / ".tmp-checkpoint-200").mkdir()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-5", "checkpoint-20"]
    assert ckpt.resolve_resume("latest", tmp_path).name == "checkpoint-20"
    assert ckpt.resolve_resume(str(tmp_path / "checkpoint-5"), tmp_path).name == "checkpoint-5"
    assert ckpt.resolve_resume(None, tmp_path) is None


def test_missing_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        ckpt.resolve_resume("latest", tmp_path)
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        ckpt.resolve_resume(str(tmp_path / "checkpoint-7"), tmp_path)


def test_output_dir_with_old_run_needs_a_decision(tmp_path):
    make(tmp_path, 10)
    with pytest.raises(FileExistsError, match="--resume_from_checkpoint latest"):
        ckpt.check_output_dir(tmp_path, resuming=False, overwrite=False)
    ckpt.check_output_dir(tmp_path, resuming=True, overwrite=False)
    ckpt.check_output_dir(tmp_path, resuming=False, overwrite=True)
    ckpt.remove_checkpoints(tmp_path)
    assert ckpt.list_checkpoints(tmp_path) == []
