"""Two real processes (gloo on CPU) that the filesystem could split: every rank resumes the checkpoint the main
process resolved, and an output folder the machines do not share is refused at start."""

import json

import pytest

from tests.helpers import launch

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
CONFIG = ["--config_file", "accelerate_configs/cpu_ddp.yaml"]


def run_ranks(mode: str, out, results, port: int) -> list[dict]:
    results.mkdir()
    done = launch([*CONFIG, "--main_process_port", str(port), "tests/distributed/output_dir_on_ranks.py", mode,
                   str(out), str(results)], env={"ACCELERATE_USE_CPU": "true"})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((results / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(rank["world"] == 2 for rank in ranks)
    return ranks


def fake_checkpoint(folder, step: int) -> None:
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "files": {}}))


def test_every_rank_resumes_the_checkpoint_the_main_process_resolved(tmp_path):
    out = tmp_path / "run"
    fake_checkpoint(out / "checkpoint-2", 2)
    fake_checkpoint(out / "checkpoint-4", 4)
    ranks = run_ranks("stale", out, tmp_path / "results", 29561)
    # rank 1's own listing misses checkpoint-4: it must still resume what the main process chose
    assert [rank.get("resume") for rank in ranks] == ["checkpoint-4", "checkpoint-4"], ranks


def test_an_output_folder_the_machines_do_not_share_is_refused_at_start(tmp_path):
    ranks = run_ranks("separate", tmp_path / "run", tmp_path / "results", 29563)
    for rank in ranks:  # every rank stops, with the same line
        assert "error" in rank, ranks
        assert rank["error"].startswith(f"--output_dir {tmp_path / 'run' / 'rank0'} is not shared by all machines")
        assert "process 1 on" in rank["error"] and "mounts at the same path" in rank["error"]
