"""Bytes of one checkpoint of a full and a LoRA fine-tune, flow, musicgen_text and stable_audio, on the tests' tiny
models.

    python -m benchmarks.checkpoint_sizes [--output_dir DIR]    # from the repository root (it reuses tests/helpers)

Fine-tunes the tests' tiny models 2 steps with a checkpoint at step 2: a flow pipeline (a micro DiT pretrained here
for 2 steps over the block-DCT latents, with its T5), a tiny Hub-layout MusicGen (T5 + EnCodec + decoder) and a tiny
Stable-Audio-Open-shaped pipeline (stereo VAE, v-objective scheduler), each with all weights and with `--use_peft`.
Prints the bytes of `checkpoint-2/`, of what it holds that is a frozen part (the pipeline's text_encoder/, tokenizer/,
vae/; weights of the frozen T5, EnCodec or LoRA base), and of the run's `frozen/` folder (stored once per run; absent
before this was added). Run it in two checkouts to compare them.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from safetensors import safe_open

from hf_audio_trainer import finetune, pretrain
from tests.helpers import (
    described_folder,
    flow_quick_run,
    stable_audio_quick_run,
    tiny_codec,
    tiny_musicgen,
    tiny_stable_audio,
)

FROZEN_FOLDERS = ("text_encoder", "tokenizer", "vae", "scheduler")


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.is_dir() else 0


def frozen_weight_bytes(checkpoint: Path, trained: tuple[str, ...]) -> int:
    """Bytes of the tensors in the checkpoint's model.safetensors whose names start with none of `trained` (or hold
    no `lora_`), and of the DiT's Fourier frequencies (frozen in every flow run)."""
    total = 0
    with safe_open(str(checkpoint / "model.safetensors"), "pt") as f:
        for name in f.keys():
            if "time_proj" in name or not (name.startswith(trained) or "lora_" in name):
                tensor = f.get_tensor(name)
                total += tensor.numel() * tensor.element_size()
    return total


def report(name: str, out: Path, trained: tuple[str, ...]) -> None:
    checkpoint = out / "checkpoint-2"
    folders = sum(folder_bytes(checkpoint / part) for part in FROZEN_FOLDERS)
    weights = frozen_weight_bytes(checkpoint, trained)
    print(
        f"{name:22s} checkpoint {folder_bytes(checkpoint):>10,d} B   of it frozen: folders {folders:>9,d} B, "
        f"weights {weights:>9,d} B   frozen/ {folder_bytes(out / 'frozen'):>10,d} B"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default=None, help="where the runs go (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.output_dir) as tmp:
        root = Path(tmp)
        short = dict(max_steps=2, save_steps=2, report_to="none")
        pipeline = root / "flow-pretrain"
        pretrain(flow_quick_run(pipeline, **short))
        # LoRA: the DiT's attention; full: every weight the flow model trains (transformer + projection)
        flow_trained = {"full": ("transformer.", "projection."), "lora": ()}
        for kind, extra in {"full": {}, "lora": {"use_peft": True}}.items():
            out = root / f"flow-{kind}"
            finetune(flow_quick_run(out, model_name_or_path=str(pipeline), high_quality_only=False, **short, **extra))
            report(f"flow {kind}", out, flow_trained[kind])
        model = tiny_musicgen(root / "musicgen", tiny_codec(root / "codec"))
        music = described_folder(root / "music")
        text_trained = {"full": ("decoder.", "enc_to_dec_proj."), "lora": ()}
        for kind, extra in {"full": {}, "lora": {"use_peft": True}}.items():
            out = root / f"text-{kind}"
            finetune({
                "model_family": "musicgen_text", "model_name_or_path": str(model), "dataset_name": str(music),
                "output_dir": str(out), "per_device_train_batch_size": 4, "max_duration_seconds": 1.0,
                "eval_steps": 0, "eval_on_start": False, "logging_steps": 1, **short, **extra,
            })  # fmt: skip
            report(f"musicgen_text {kind}", out, text_trained[kind])
        source = tiny_stable_audio(root / "stable-audio")
        for kind, extra in {"full": {}, "lora": {"use_peft": True}}.items():
            out = root / f"stable-audio-{kind}"
            finetune(stable_audio_quick_run(source, out, high_quality_only=False, **short, **extra))
            report(f"stable_audio {kind}", out, flow_trained[kind])


if __name__ == "__main__":
    main()
