"""The quickstart notebook runs headless end to end (three tiny stages) and is stored without outputs."""

import json
import re
import sys

import nbformat
import pytest
from ipykernel.kernelspec import install as install_kernelspec
from nbclient import NotebookClient

from tests.helpers import ROOT

pytestmark = pytest.mark.slow

NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"
KERNEL = "hfat-test"


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)


def test_quickstart_notebook_runs_the_three_stages(tmp_path, monkeypatch):
    # a kernel of this very interpreter (the venv with the editable package), whatever python3 points to
    prefix = tmp_path / "kernels"
    install_kernelspec(prefix=str(prefix), kernel_name=KERNEL)
    spec = json.loads((prefix / "share" / "jupyter" / "kernels" / KERNEL / "kernel.json").read_text())
    assert spec["argv"][0] == sys.executable
    monkeypatch.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
    out = tmp_path / "runs"
    # the kernel inherits this environment
    for name, value in {
        "QUICKSTART_DIR": str(out),
        "QUICKSTART_STEPS": "4",
        "QUICKSTART_CLIPS": "64",
        "QUICKSTART_PAIRS": "24",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("QUICKSTART_LAUNCHER", raising=False)

    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name=KERNEL, resources={"metadata": {"path": str(ROOT)}}).execute()
    # (a failing cell raises CellExecutionError above)

    for stage in ("pretrain", "finetune", "align"):
        assert (out / stage / "model.safetensors").is_file(), stage
        assert (out / stage / "tokenizer").is_dir(), stage

    # stdout only: progress bars go to stderr, and without a newline they would run into the printed lines
    printed = "".join(
        o.get("text", "")
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
        if o.output_type == "stream" and o.get("name") == "stdout"
    )
    accuracy = re.search(r"align: reward accuracy (\S+)", printed)
    assert accuracy, printed[-2000:]
    assert 0.0 <= float(accuracy.group(1)) <= 1.0
    assert re.search(r"align: reward margin -?\d", printed)
    assert re.search(r"^[\d,]+ parameters$", printed, re.MULTILINE)
    assert not (out / "pretrain-2proc").exists()  # the launcher cell stays off by default
