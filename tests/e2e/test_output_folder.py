"""What a run leaves in its output folder across the faults of a long run: rolling back to an earlier checkpoint, a
kill while best/ is replaced, a host crash right after a save (what is on disk before older checkpoints go), and a
new run over an old one with --overwrite_output_dir."""

import json
import os
import shutil
from pathlib import Path

import pytest

from hf_audio_trainer import pretrain
from hf_audio_trainer.checkpoint import (
    Checkpointer,
    frozen_parts_of,
    list_checkpoints,
    resolve_resume,
    verify_checkpoint,
)
from hf_audio_trainer.hub import _STAGING_PREFIX
from tests.helpers import fit_small_tokenizer, max_abs_diff, quick_run, weights

pytestmark = [pytest.mark.slow, pytest.mark.fault]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return fit_small_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def settings(tokenizer, out, **overrides):
    return quick_run(tokenizer, out, **{"model_size": "micro", **overrides})


def scripted_evaluations(monkeypatch, values: dict[int, float]) -> None:
    """Each evaluation reports `values[step]` as eval/loss, so which save is best is chosen by the test."""
    record = Checkpointer.record
    monkeypatch.setattr(
        Checkpointer, "record", lambda self, step, res: record(self, step, {**res, "eval/loss": values[step]})
    )


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("source", ["checkpoint-4", "best"])
def test_rolling_back_sets_the_abandoned_checkpoints_aside_and_latest_follows_the_new_run(
    tokenizer, tmp_path, monkeypatch, capsys, source
):
    out = tmp_path / "run"
    # the first run: a checkpoint every 2 steps, the last 3 kept; the loss "spikes" after step 4, so best/ is step 4
    with monkeypatch.context() as patched:
        scripted_evaluations(patched, {2: 3.0, 4: 2.0, 6: 2.5, 8: 2.6})
        pretrain(settings(tokenizer, out, max_steps=8, save_steps=2, eval_steps=2, save_total_limit=3))
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-4", "checkpoint-6", "checkpoint-8"]
    assert verify_checkpoint(out / "best")["global_step"] == 4
    abandoned = weights(out)  # its final model, of step 8
    frozen = (out / "frozen" / "frozen.json").read_text()
    capsys.readouterr()
    # the usual answer to a spike: back to step 4 with a lower --learning_rate (its checkpoints record it: that tells
    # them from the abandoned run's); this run saves at 5 and 6 (it is stopped there, as a preempted run would be,
    # before it reaches the abandoned run's last step)
    pretrain(
        settings(
            tokenizer, out, max_steps=6, save_steps=1, save_total_limit=3, learning_rate=5e-4,
            resume_from_checkpoint=str(out / source),
        )
    )  # fmt: skip
    printed = capsys.readouterr().out
    # `latest` is the new run's last checkpoint, and rotation counted the new run's checkpoints only: its own two and
    # the one it resumed from
    latest = resolve_resume("latest", out)
    assert latest == out / "checkpoint-6" and verify_checkpoint(latest)["config"]["learning_rate"] == 5e-4
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-4", "checkpoint-5", "checkpoint-6"]
    # nothing of the abandoned run was deleted: its later checkpoints, its final model and its log are set aside,
    # whole, in one folder that one printed line names
    (aside,) = out.glob("superseded-*")
    assert "moved checkpoint-6, checkpoint-8, the final model of step 8" in printed and f"to {aside.name}/" in printed
    assert {"checkpoint-6", "checkpoint-8", "metrics.jsonl", "model.safetensors", "tokenizer"} <= set(names(aside))
    assert max_abs_diff(weights(aside), abandoned) == 0 and max_abs_diff(weights(out), abandoned) > 0
    assert verify_checkpoint(aside / "checkpoint-8")["config"]["learning_rate"] == 2e-3
    assert max(json.loads(line)["step"] for line in (aside / "metrics.jsonl").read_text().splitlines()) == 8
    assert verify_checkpoint(out / "best")["global_step"] == 4  # best/ is the step the new run grew from
    # the run's frozen parts serve on, for the new run's checkpoints and for those set aside (found one level up)
    assert (out / "frozen" / "frozen.json").read_text() == frozen
    assert frozen_parts_of(aside / "checkpoint-8") == out / "frozen" == frozen_parts_of(out / "checkpoint-5")
    # and `latest` goes on from the new run's step 6, setting nothing more aside
    pretrain(settings(tokenizer, out, max_steps=7, save_steps=1, learning_rate=5e-4, resume_from_checkpoint="latest"))
    assert f"Resumed from {out / 'checkpoint-6'} at step 6" in capsys.readouterr().out
    assert len(list(out.glob("superseded-*"))) == 1


class Killed(BaseException):
    """Stands in for kill -9: nothing after it runs (no handler catches a BaseException that is not an Exception)."""


def kill_at(monkeypatch, module, name: str, hit, nth: int) -> None:
    """Make `module.name(...)` raise Killed the `nth` time `hit(*args)` is true."""
    real, seen = getattr(module, name), []

    def wrapped(*args, **kwargs):
        if hit(*args):
            seen.append(args)
            if len(seen) == nth:
                raise Killed(f"{name}{args}")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)


# where step 4's new best/ (replacing step 2's) is killed
KILL_POINTS = {
    # deleting the replaced best/ (in a .deleting-* folder by then): the first deletion of a best/
    "while deleting the old best": (
        shutil, "rmtree", lambda path, *rest: Path(path).name.startswith(".deleting-best"), 1,
    ),
    # the new best/ is complete in .tmp-best, about to be renamed into place: the second best/ written
    "before the new best is renamed into place": (
        os, "replace", lambda src, dst, *rest: (Path(src).name, Path(dst).name) == (".tmp-best", "best"), 2,
    ),
}  # fmt: skip


@pytest.mark.parametrize(
    "kill_point, values, best",
    [
        # a kill mid-delete used to leave a .deleting-best folder that every later new best collided with
        ("while deleting the old best", {2: 3.0, 4: 2.0, 6: 1.5, 8: 1.0}, 8),
        # the checkpoint's record named step 4 as the best while no best/ held it: nothing after beats 4, so no
        # best/ came back
        ("before the new best is renamed into place", {2: 3.0, 4: 2.0, 6: 2.5, 8: 2.5}, 4),
    ],
)
def test_a_kill_while_best_is_replaced_then_resume_keeps_best_and_sweeps_leftovers(
    tokenizer, tmp_path, monkeypatch, kill_point, values, best
):
    out = tmp_path / "run"
    run = dict(max_steps=8, save_steps=2, eval_steps=2, save_total_limit=2)
    scripted_evaluations(monkeypatch, values)
    with monkeypatch.context() as patched:
        kill_at(patched, *KILL_POINTS[kill_point])
        with pytest.raises(Killed):
            pretrain(settings(tokenizer, out, **run))
    assert resolve_resume("latest", out).name == "checkpoint-4"  # killed while saving step 4's best
    # what other kills leave behind: a Hub push's scratch export and staging copy, a half-deleted checkpoint
    for leftover in (".tmp-push-k1ll3d", f"{_STAGING_PREFIX}k1ll3d", ".deleting-checkpoint-1-k1ll3d"):
        (out / leftover / "sub").mkdir(parents=True)
        (out / leftover / "sub" / "model.safetensors").write_bytes(b"partial")
    (out / "notes.txt").write_text("the user's own file")
    (out / ".cache").mkdir()  # and the user's own hidden folder

    pretrain(settings(tokenizer, out, resume_from_checkpoint="latest", **run))
    assert (out / "best").is_dir(), f"no best/ after the resumed run: {names(out)}"
    state = verify_checkpoint(out / "best")
    assert state["global_step"] == best and state["best"] == {
        "step": best,
        "value": values[best],
        "metric": "eval/loss",
    }
    assert not [p.name for p in out.iterdir() if p.name.startswith((".tmp-", ".deleting-"))]
    assert (out / "notes.txt").read_text() == "the user's own file" and (out / ".cache").is_dir()


def test_a_save_is_on_disk_before_older_checkpoints_are_deleted(tokenizer, tmp_path, monkeypatch):
    """A host crash loses what is still in the page cache: every file and folder of a new checkpoint (and of a new
    best/) is fsynced before its rename, the output folder right after it, and only then does an older one go."""
    out = (tmp_path / "run").resolve()
    events = []  # ("fsync", path) | ("replace", src, dst, [what src holds]) | ("rmtree", path)
    fsync, replace, rmtree = os.fsync, os.replace, shutil.rmtree

    def recorded_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return fsync(fd)

    def recorded_replace(src, dst, *args, **kwargs):
        src = Path(src).resolve()
        inside = [str(p) for p in src.rglob("*")] if src.is_dir() else []
        events.append(("replace", str(src), str(Path(dst).resolve()), inside))
        return replace(src, dst, *args, **kwargs)

    def recorded_rmtree(path, *args, **kwargs):
        events.append(("rmtree", str(Path(path).resolve())))
        return rmtree(path, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", recorded_fsync)
    monkeypatch.setattr(os, "replace", recorded_replace)
    monkeypatch.setattr(shutil, "rmtree", recorded_rmtree)
    scripted_evaluations(monkeypatch, {1: 3.0, 2: 2.0, 3: 1.0})  # a new best/ at every save
    pretrain(settings(tokenizer, out, max_steps=3, save_steps=1, eval_steps=1, save_total_limit=1, ema=True))

    published = [
        (i, e)
        for i, e in enumerate(events)
        if e[0] == "replace" and Path(e[1]).name.startswith((".tmp-checkpoint-", ".tmp-best"))
    ]
    assert [Path(e[2]).name for _, e in published] == [
        name for step in (1, 2, 3) for name in (f"checkpoint-{step}", "best")
    ]
    for i, (_, src, dst, inside) in published:
        synced = {e[1] for e in events[:i] if e[0] == "fsync"}
        missing = [p for p in [src, *inside] if p not in synced]
        assert inside and not missing, f"not fsynced before {Path(src).name} became {Path(dst).name}: {missing}"
        parent = next((j for j in range(i + 1, len(events)) if events[j] == ("fsync", str(out))), None)
        assert parent is not None, f"{out} not fsynced after {Path(dst).name} was renamed into place"
        between = [e for e in events[i + 1 : parent] if e[0] != "fsync"]
        assert not between, f"{between} before the rename of {Path(dst).name} was made durable"
        if Path(dst).name in ("checkpoint-2", "checkpoint-3"):  # the rotation deletes the previous one only now
            step = int(Path(dst).name.split("-")[1])
            previous = str(out / f"checkpoint-{step - 1}")
            assert next(j for j, e in enumerate(events) if e[0] != "fsync" and e[1] == previous) > parent


class Stop(Exception):
    """Ends a run after its first checkpoint, before its final export."""


def test_overwrite_output_dir_starts_clean_of_the_old_runs_outputs_and_keeps_the_users_files(
    tokenizer, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    pretrain(settings(tokenizer, out, max_steps=4, save_steps=2, eval_steps=2, ema=True))
    exported = {"config.json", "generation_config.json", "model.safetensors", "tokenizer"}
    assert exported | {"best", "ema", "checkpoint-2", "checkpoint-4", "frozen"} <= set(names(out)), names(out)
    old_frozen = json.loads((out / "frozen" / "frozen.json").read_text())["id"]
    (out / "superseded-20250101-000000" / "checkpoint-6").mkdir(parents=True)  # what a rollback set aside
    (out / "superseded-20250101-000000" / "checkpoint-6" / "trainer_state.json").write_text('{"global_step": 6}')
    (out / "notes.txt").write_text("the user's own file")
    (out / "samples").mkdir()
    (out / "samples" / "reference.wav").write_bytes(b"RIFF")

    save = Checkpointer.save

    def save_then_stop(self, step):
        save(self, step)
        raise Stop

    monkeypatch.setattr(Checkpointer, "save", save_then_stop)
    with pytest.raises(Stop):  # a new run, no EMA, no evaluation, stopped after its first checkpoint
        pretrain(settings(tokenizer, out, max_steps=4, save_steps=1, overwrite_output_dir=True))
    # nothing of the old run is left to pass for the new run's: no best/ or ema/, no final model, no checkpoints set
    # aside; the user's own files stay
    kept = {"checkpoint-1", "frozen", "metrics.jsonl", "run_config.json", "notes.txt", "samples", ".lock"}
    assert set(names(out)) == kept, names(out)
    new_frozen = json.loads((out / "frozen" / "frozen.json").read_text())["id"]  # the new run's frozen parts
    assert new_frozen != old_frozen and verify_checkpoint(out / "checkpoint-1")["frozen"] == new_frozen
    assert (out / "samples" / "reference.wav").read_bytes() == b"RIFF"
