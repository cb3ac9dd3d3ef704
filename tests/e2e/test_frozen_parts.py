"""Checkpoints never copy frozen parts (issue 25, item 5): for flow, musicgen_text and stable_audio, full and LoRA
fine-tunes, a checkpoint holds what trains and names its run's frozen/ folder, which holds the rest once; a resume
from any checkpoint (in the run's folder or another) ends where the straight run does and exports what its library
loads; best/ joins the frozen parts back in; a checkpoint written before frozen/ existed still resumes; and a
checkpoint that does not fit, or whose frozen parts are gone, is refused with one line."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import MusicgenForConditionalGeneration

from hf_audio_trainer import finetune, pretrain
from hf_audio_trainer.checkpoint import STATE_FILE, verify_checkpoint
from hf_audio_trainer.errors import ConfigError
from hf_audio_trainer.families import FAMILIES
from tests.e2e.test_musicgen_text import run_settings as text_settings
from tests.helpers import (
    described_folder,
    flow_quick_run,
    max_abs_diff,
    stable_audio_quick_run,
    tiny_codec,
    tiny_musicgen,
    tiny_stable_audio,
    weights,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

# what the old checkpoints held of the frozen parts: the pipeline's folders and index, the model folder's files
FROZEN_FILES = {
    "flow": ("text_encoder", "tokenizer", "vae", "scheduler", "model_index.json", "latents.json"),
    "musicgen_text": ("config.json", "generation_config.json", "processor_config.json", "tokenizer_config.json"),
    "stable_audio": ("text_encoder", "tokenizer", "vae", "scheduler", "model_index.json"),
}
# names of frozen weights: the frozen T5 and EnCodec inside MusicGen, the DiT's fixed Fourier frequencies
FROZEN_WEIGHTS = {
    "flow": ("time_proj",),
    "musicgen_text": ("text_encoder.", "audio_encoder."),
    "stable_audio": ("time_proj",),
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """What the fine-tunes start from: a flow pipeline (a micro DiT pretrained 2 steps) and a tiny Hub MusicGen."""
    root = tmp_path_factory.mktemp("sources")
    pretrain(flow_quick_run(root / "pipeline", max_steps=2, save_steps=2))
    model = tiny_musicgen(root / "musicgen", tiny_codec(root / "codec"))
    return {"flow": root / "pipeline", "musicgen_text": model, "music": described_folder(root / "music"),
            "stable_audio": tiny_stable_audio(root / "stable_audio")}  # fmt: skip


def settings(family: str, kind: str, sources, out, **overrides) -> dict:
    """4 steps of a full or LoRA fine-tune, a checkpoint and an evaluation every 2 (so best/ exists)."""
    common = dict(max_steps=4, save_steps=2, eval_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                  condition_dropout=0.3, learning_rate=1e-2)  # fmt: skip
    if family == "flow":
        run = flow_quick_run(out, model_name_or_path=str(sources["flow"]), high_quality_only=False, **common)
    elif family == "stable_audio":
        run = stable_audio_quick_run(sources["stable_audio"], out, high_quality_only=False, **common)
    else:
        run = text_settings(out, model_name_or_path=str(sources["musicgen_text"]), dataset_name=str(sources["music"]),
                            **common)  # fmt: skip
    lora = {"use_peft": True, "lora_dropout": 0.0} if kind == "lora" else {}
    return {**run, **lora, **overrides}


def exported(folder, family: str, kind: str) -> dict[str, torch.Tensor]:
    """The exported weights (a LoRA fine-tune's merged in: the export is a plain model or pipeline folder)."""
    return weights(folder)


def folder_bytes(folder) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def frozen_id(out) -> str:
    return json.loads((out / "frozen" / "frozen.json").read_text())["id"]


CASES = [(family, kind) for family in ("flow", "musicgen_text", "stable_audio") for kind in ("full", "lora")]


@pytest.mark.parametrize("family, kind", CASES, ids=[f"{f}-{k}" for f, k in CASES])
def test_a_checkpoint_holds_what_trains_and_resumes_exactly_from_its_runs_frozen_parts(family, kind, sources, tmp_path):
    straight = tmp_path / "straight"
    finetune(settings(family, kind, sources, straight))
    checkpoint, frozen = straight / "checkpoint-2", straight / "frozen"
    state = verify_checkpoint(checkpoint)
    assert state["frozen"] == frozen_id(straight) and state["weights"] == "trained"
    # no frozen part in the checkpoint: none of their files, none of their weights ...
    assert not [name for name in FROZEN_FILES[family] if (checkpoint / name).exists()]
    assert all((frozen / name).exists() for name in FROZEN_FILES[family])
    saved, rest = load_file(str(checkpoint / "model.safetensors")), load_file(str(frozen / "frozen.safetensors"))
    assert not [k for k in saved if any(part in k for part in FROZEN_WEIGHTS[family])]
    assert [k for k in rest if any(part in k for part in FROZEN_WEIGHTS[family])]  # they are in frozen/, once
    assert not saved.keys() & rest.keys()
    if kind == "lora":  # the adapters, nothing of the base model
        assert saved and all("lora_" in k for k in saved)
    # ... so it is smaller than best/, which joins them in as every checkpoint did before
    best = straight / "best"
    best_state = verify_checkpoint(best)
    assert "frozen" not in best_state and best_state["weights"] == "all"
    assert folder_bytes(best) > folder_bytes(checkpoint) + 0.9 * folder_bytes(frozen)
    joined = load_file(str(best / "model.safetensors"))
    assert joined.keys() == saved.keys() | rest.keys()
    if family == "musicgen_text" and kind == "full":  # best/ still loads with transformers (docs/families)
        loaded = MusicgenForConditionalGeneration.from_pretrained(best)
        assert torch.equal(loaded.decoder.lm_heads[0].weight, joined["decoder.lm_heads.0.weight"])

    # 2 + resume + 2 == 4, in another folder, which gets frozen/ of its own; its export loads with its library alone
    elsewhere = tmp_path / "elsewhere"
    finetune(settings(family, kind, sources, elsewhere, resume_from_checkpoint=str(checkpoint)))
    assert max_abs_diff(exported(elsewhere, family, kind), exported(straight, family, kind)) < 1e-6
    assert verify_checkpoint(elsewhere / "checkpoint-4")["frozen"] == frozen_id(elsewhere)
    if not (family == "flow" and kind == "lora"):
        loaded = FAMILIES[family].load_export(elsewhere)
        assert type(loaded).__module__.split(".")[0] in ("transformers", "diffusers")
    if family == "musicgen_text" and kind == "lora":  # merged: a plain model
        assert not [k for k in weights(elsewhere) if "lora" in k]

    # and in the run's own folder (a rollback): its frozen/ serves on, not written again
    before = exported(straight, family, kind)
    written = (frozen / "frozen.json").stat().st_mtime_ns, frozen_id(straight)
    finetune(settings(family, kind, sources, straight, resume_from_checkpoint=str(checkpoint)))
    assert max_abs_diff(exported(straight, family, kind), before) < 1e-6
    assert ((frozen / "frozen.json").stat().st_mtime_ns, frozen_id(straight)) == written
    assert verify_checkpoint(straight / "checkpoint-4")["frozen"] == written[1]


def written_before(checkpoint, frozen, folder) -> None:
    """`checkpoint` as it was written before frozen/ existed: its frozen parts' files in it, every weight in its
    model.safetensors, no record of frozen/."""
    shutil.copytree(checkpoint, folder)
    for item in frozen.iterdir():
        if not item.name.startswith("frozen"):
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, folder / item.name)
    merged = {**load_file(str(frozen / "frozen.safetensors")), **load_file(str(folder / "model.safetensors"))}
    save_file(merged, str(folder / "model.safetensors"), metadata={"format": "pt"})
    state = json.loads((folder / STATE_FILE).read_text())
    del state["frozen"], state["weights"]
    files = [f for f in folder.rglob("*") if f.is_file() and f.name != STATE_FILE]
    state["files"] = {str(f.relative_to(folder)): f.stat().st_size for f in files}
    (folder / STATE_FILE).write_text(json.dumps(state))


@pytest.mark.parametrize("family, kind", [("flow", "full"), ("musicgen_text", "lora")])
def test_a_checkpoint_written_before_frozen_parts_were_stored_apart_still_resumes(family, kind, sources, tmp_path):
    straight = tmp_path / "straight"
    finetune(settings(family, kind, sources, straight, eval_steps=0))
    old = tmp_path / "old-run" / "checkpoint-2"
    written_before(straight / "checkpoint-2", straight / "frozen", old)
    resumed = tmp_path / "resumed"
    finetune(settings(family, kind, sources, resumed, eval_steps=0, resume_from_checkpoint=str(old)))
    assert max_abs_diff(weights(resumed), weights(straight)) < 1e-6
    assert verify_checkpoint(resumed / "checkpoint-4")["frozen"] == frozen_id(resumed)  # the new run stores its own


def test_a_checkpoint_that_does_not_fit_or_lost_its_frozen_parts_is_refused_by_name(sources, tmp_path):
    out = tmp_path / "run"
    finetune(settings("musicgen_text", "full", sources, out, max_steps=2, eval_steps=0))
    checkpoint = out / "checkpoint-2"
    # the same weights split otherwise (a layer frozen now): every shape fits, yet it would train the wrong ones
    layer = "decoder.model.decoder.layers.0.*"
    frozen_layer = settings("musicgen_text", "full", sources, tmp_path / "a", eval_steps=0,
                            resume_from_checkpoint=str(checkpoint), freeze_modules=layer)  # fmt: skip
    with pytest.raises(ConfigError, match=r"does not fit this run's model: freeze_modules='decoder.model.decoder"):
        finetune(frozen_layer)
    adapters = settings("musicgen_text", "full", sources, tmp_path / "b", eval_steps=0,
                        resume_from_checkpoint=str(checkpoint), use_peft=True)  # fmt: skip
    with pytest.raises(ConfigError, match="does not fit this run's model: use_peft=True here, False in the checkpoint"):
        finetune(adapters)
    # copied without its run's frozen/, or with frozen/ damaged
    alone = tmp_path / "copied" / "checkpoint-2"
    shutil.copytree(checkpoint, alone)
    again = settings("musicgen_text", "full", sources, tmp_path / "c", eval_steps=0, resume_from_checkpoint=str(alone))
    with pytest.raises(ConfigError, match=r"keeps its frozen parts .* in its run's frozen/ folder, and none with"):
        finetune(again)
    weights_file = out / "frozen" / "frozen.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:-8])
    again["resume_from_checkpoint"] = str(checkpoint)
    with pytest.raises(ConfigError, match=r"frozen.safetensors is truncated or altered"):
        finetune(again)


def test_a_resume_reads_the_frozen_parts_its_run_stored_not_the_source_again(sources, tmp_path):
    """The pipeline a flow fine-tune started from changes after the checkpoint (its T5 and the DiT's frozen Fourier
    frequencies doubled): the resume reads them from frozen/, so it still ends where the straight run does."""
    source = tmp_path / "pipeline"
    shutil.copytree(sources["flow"], source)
    straight = tmp_path / "straight"
    finetune(settings("flow", "full", sources, straight, model_name_or_path=str(source), eval_steps=0))
    for file, names in (("text_encoder/model.safetensors", None), ("transformer/diffusion_pytorch_model.safetensors",
                                                                    ("time_proj.weight",))):  # fmt: skip
        tensors = load_file(str(source / file))
        changed = {k: v * 2 if names is None or k in names else v for k, v in tensors.items()}
        save_file(changed, str(source / file), metadata={"format": "pt"})
    resumed = tmp_path / "resumed"
    finetune(settings("flow", "full", sources, resumed, model_name_or_path=str(source), eval_steps=0,
                      resume_from_checkpoint=str(straight / "checkpoint-2")))  # fmt: skip
    assert max_abs_diff(weights(resumed), weights(straight)) < 1e-6
