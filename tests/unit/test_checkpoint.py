import errno
import json

import pytest
import torch

from hf_audio_trainer import checkpoint as ckpt
from hf_audio_trainer.errors import WriteError
from hf_audio_trainer.models import WeightsDoNotFit, load_entries, split_state_dict, trained_names
from hf_audio_trainer.output_folder import remove_run_outputs


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
    remove_run_outputs(tmp_path)
    assert ckpt.list_checkpoints(tmp_path) == []


def test_latest_skips_a_damaged_newest_checkpoint_with_a_warning(tmp_path):
    make(tmp_path, 5)
    make(tmp_path, 10)
    (make(tmp_path, 15) / ckpt.STATE_FILE).write_text('{"global_step": 15, "files": {')  # cut off mid-write
    truncated = make(tmp_path, 20)
    (truncated / "model.safetensors").write_bytes(b"12")
    (truncated / ckpt.STATE_FILE).write_text(json.dumps({"global_step": 20, "files": {"model.safetensors": 4}}))
    warnings = []
    assert ckpt.resolve_resume("latest", tmp_path, warn=warnings.append).name == "checkpoint-10"
    assert len(warnings) == 2
    assert "skipping checkpoint-20" in warnings[0] and "model.safetensors is truncated" in warnings[0]
    assert "skipping checkpoint-15" in warnings[1] and "trainer_state.json cannot be read" in warnings[1]
    # named explicitly, a damaged checkpoint is an error, not a silent fallback
    with pytest.raises(ValueError, match="checkpoint-15 is damaged: trainer_state.json cannot be read"):
        ckpt.verify_checkpoint(tmp_path / "checkpoint-15")


def test_only_damaged_checkpoints_is_an_error_naming_the_newest_damage(tmp_path):
    (make(tmp_path, 3) / ckpt.STATE_FILE).write_text("not json")
    (make(tmp_path, 6) / ckpt.STATE_FILE).write_text("[]")
    with pytest.raises(ValueError, match=r"checkpoint-6 is damaged: trainer_state.json has no global_step"):
        ckpt.resolve_resume("latest", tmp_path, warn=lambda message: None)


@pytest.mark.parametrize(
    "error, reason",
    [
        (OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
        (RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 82048 vs 81940"), "unexpected pos"),
        (OSError(errno.EFBIG, "File too large"), "File too large"),
    ],
)
def test_a_refused_write_removes_the_partial_folder_and_names_what_is_intact(tmp_path, error, reason):
    make(tmp_path, 2)
    tmp = tmp_path / ".tmp-checkpoint-4"
    with pytest.raises(WriteError) as failed:
        with ckpt.removed_on_failure(tmp, "checkpoint-4", tmp_path):
            tmp.mkdir()
            (tmp / "optimizer.bin").write_bytes(b"half")
            raise error
    assert not tmp.exists()
    message = str(failed.value)
    assert "could not write checkpoint-4" in message and "the disk refused a write" in message and reason in message
    assert f"the previous checkpoint {tmp_path / 'checkpoint-2'} is intact" in message
    assert "--resume_from_checkpoint latest" in message


def test_any_other_failure_keeps_its_own_error_but_still_cleans_up(tmp_path):
    tmp = tmp_path / ".tmp-checkpoint-4"
    with pytest.raises(KeyError, match="a bug"):
        with ckpt.removed_on_failure(tmp, "checkpoint-4", tmp_path):
            tmp.mkdir()
            raise KeyError("a bug")
    assert not tmp.exists()


def test_a_delete_cut_short_by_a_kill_does_not_block_the_next_new_best(tmp_path, accelerator):
    # a kill during the deletion of the previous best/ left its hidden folder behind, half deleted
    leftover = tmp_path / ".deleting-best"
    leftover.mkdir()
    (leftover / "optimizer.bin").write_bytes(b"half")
    for step in (2, 4, 6):  # every later new best replaces best/
        ckpt.copy_to_best(accelerator, tmp_path, make(tmp_path, step))
        assert json.loads((tmp_path / "best" / ckpt.STATE_FILE).read_text())["global_step"] == step


class Codebook(torch.nn.Module):
    """Like EnCodec's codebook: EMA-trained buffers, no parameters."""

    def __init__(self):
        super().__init__()
        self.register_buffer("embed", torch.randn(4, 2))
        self.register_buffer("window", torch.ones(3), persistent=False)


class Net(torch.nn.Module):
    """A trained codec (a parameter and a parameter-less codebook), a frozen one, and a tied pair of weights."""

    def __init__(self):
        super().__init__()
        self.codec = torch.nn.Sequential(torch.nn.Linear(2, 2), Codebook())
        self.frozen = torch.nn.Sequential(torch.nn.Linear(2, 2), Codebook()).requires_grad_(False)
        self.embed, self.head = torch.nn.Embedding(5, 2), torch.nn.Linear(2, 5, bias=False)
        self.head.weight = self.embed.weight
        self.shared = torch.nn.Embedding(5, 2).requires_grad_(False)
        self.tied = torch.nn.Embedding(5, 2)
        self.tied.weight = self.shared.weight


def test_what_trains_is_the_trainable_parameters_and_the_buffers_of_modules_that_train():
    net = Net()
    assert trained_names(net) == {
        "codec.0.weight", "codec.0.bias", "codec.1.embed",  # a trained codec's codebook trains with it
        "embed.weight", "head.weight",  # one parameter under two names
    }  # fmt: skip
    trained, frozen = split_state_dict(net)
    assert set(trained) == {"codec.0.weight", "codec.0.bias", "codec.1.embed", "embed.weight"}  # each tensor once
    assert set(frozen) == {"frozen.0.weight", "frozen.0.bias", "frozen.1.embed", "shared.weight"}
    assert trained["embed.weight"].data_ptr() == net.embed.weight.data_ptr()  # the model's own storage


def test_loading_needs_exactly_the_trained_and_the_frozen_entries_of_the_model():
    source, target = Net(), Net()
    trained, frozen = split_state_dict(source)
    load_entries(target, {k: v.clone() for k, v in trained.items()}, {k: v.clone() for k, v in frozen.items()}, True)
    loaded = target.state_dict()
    assert all(torch.equal(value, loaded[name]) for name, value in source.state_dict().items())
    assert torch.equal(target.head.weight, source.embed.weight)  # the tied name got it too
    # the same entries split otherwise (the codec frozen now): every shape fits, and still it is refused
    target.codec.requires_grad_(False)
    with pytest.raises(WeightsDoNotFit, match=r"3 trained weight\(s\) unexpected .* 3 frozen weight\(s\) missing"):
        load_entries(target, trained, frozen, True)
    wrong = {**trained, "embed.weight": torch.zeros(6, 2)}
    with pytest.raises(WeightsDoNotFit, match=r"1 saved weight\(s\) of another shape \(e.g. \['embed.weight'\]\)"):
        load_entries(Net(), {**wrong, **frozen}, {}, False)
