"""--push_to_hub through a real recipe run, against the fake Hub of tests/unit/test_hub.py (127.0.0.1 only)."""

import json
import threading
import time

import pytest
from huggingface_hub import constants

from hf_audio_trainer import pretrain
from hf_audio_trainer.trackers import read_metrics
from tests.helpers import fit_small_tokenizer, quick_run
from tests.unit.test_hub import REPO, TOKEN, hub  # noqa: F401  (the fixture)

pytestmark = pytest.mark.slow


def test_a_run_pushes_at_every_save_and_trains_on_while_an_upload_hangs(hub, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
    tokenizer = fit_small_tokenizer(tmp_path / "tokenizer")
    out = tmp_path / "run"
    hub.gate.clear()  # the Hub hangs: the step-2 upload cannot finish until the run has reached step 4
    seen_step_4 = threading.Event()

    def release_when_training_went_on():
        deadline = time.time() + 300
        while time.time() < deadline:
            if (out / "metrics.jsonl").is_file() and any(m["step"] >= 4 for m in read_metrics(out)):
                seen_step_4.set()
                break
            time.sleep(0.2)
        hub.gate.set()

    threading.Thread(target=release_when_training_went_on, daemon=True).start()
    settings = dict(max_steps=4, save_steps=2, push_to_hub=True, hub_model_id=REPO, hub_token=TOKEN)
    result = pretrain(quick_run(tokenizer, out, hub_strategy="every_save", **settings))
    assert seen_step_4.is_set() and result.global_step == 4
    assert hub.repos == {REPO: False}
    messages = [c["message"] for c in hub.commits]
    assert messages[0].startswith("Training in progress, step 2") and messages[-1].startswith("End of training")
    # step 4's push goes unless it was still waiting behind step 2's when the final push replaced it
    assert messages[1:-1] in ([], ["Training in progress, step 4"])
    final = hub.commits[-1]["files"]
    assert {"model.safetensors", "config.json", "README.md", "tokenizer/tokenizer_config.json"} <= set(final)
    card = final["README.md"].decode()
    assert "library_name: hf-audio-trainer" in card and "pretrain" in card and "train/loss" in card
    assert all(TOKEN.encode() not in data for c in hub.commits for data in c["files"].values())
    assert not (out / "run_config.json").read_text().count(TOKEN)


def test_the_checkpoint_strategy_pushes_the_runs_frozen_parts_once_before_its_checkpoints(hub, tmp_path, monkeypatch):  # noqa: F811
    """last-checkpoint/ names the run's frozen/ (its tokenizer here), which goes to the repo first and once, so a
    download of the repo has both."""
    monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
    tokenizer = fit_small_tokenizer(tmp_path / "tokenizer")
    settings = dict(max_steps=4, save_steps=2, push_to_hub=True, hub_model_id=REPO, hub_token=TOKEN)
    pretrain(quick_run(tokenizer, tmp_path / "run", hub_strategy="checkpoint", **settings))
    messages = [c["message"] for c in hub.commits]
    assert messages[0] == "Frozen parts of the run" and messages.count("Frozen parts of the run") == 1
    frozen = hub.commits[0]["files"]
    assert "frozen/frozen.json" in frozen and any(name.startswith("frozen/tokenizer/") for name in frozen)
    pushed = [c["files"] for c in hub.commits if "last-checkpoint/trainer_state.json" in c["files"]]
    assert pushed and not [name for name in pushed[-1] if name.startswith("last-checkpoint/tokenizer")]
    state = json.loads(pushed[-1]["last-checkpoint/trainer_state.json"])
    assert state["frozen"] == json.loads(frozen["frozen/frozen.json"])["id"]
