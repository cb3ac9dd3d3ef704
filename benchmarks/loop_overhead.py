"""Overhead of the toolkit's loop against a hand-written PyTorch loop and transformers' Trainer.

Same model, same batches, same AdamW + warm-up/cosine schedule, same clipping, one process. Each contender runs
`--rounds` times in alternation (so machine noise hits all three alike) and the median time is compared:

    python benchmarks/loop_overhead.py [--steps 60] [--rounds 3] [--model_size tiny]

Prints time ratios against the plain loop; the target is toolkit/plain <= 1.05.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time

import torch
from accelerate import Accelerator

from hf_audio_trainer.codecs import MelKMeansTokenizer
from hf_audio_trainer.data.codes import CodesCollator
from hf_audio_trainer.data.preprocess import encode_waves
from hf_audio_trainer.data.synthetic import make_synthetic_dataset
from hf_audio_trainer.families.musicgen import build_decoder, lm_loss
from hf_audio_trainer.loop import LoopSettings, train
from hf_audio_trainer.optim import build_optimizer, build_scheduler

LR, WARMUP, MAX_NORM = 1e-3, 5, 1.0


def make_batches(steps: int, batch_size: int, model_size: str):
    data = make_synthetic_dataset(num_clips=int(steps * batch_size / 0.95) + 2, seed=0)["train"]
    waves = [a["array"] for a in data.select(range(200))["audio"]]
    tokenizer = MelKMeansTokenizer.fit(waves, sample_rate=16000, seed=0)
    codes = {"codes": [c.tolist() for c in encode_waves(tokenizer, [a["array"] for a in data["audio"]])]}
    model = build_decoder(None, model_size, tokenizer.num_codebooks, tokenizer.codebook_size, 200, dropout=0.0)
    collate = CodesCollator(tokenizer.num_codebooks, model.config.pad_token_id, model.config.bos_token_id, 50.0)
    rows = codes["codes"]
    batches = [collate([{"codes": c} for c in rows[i * batch_size : (i + 1) * batch_size]]) for i in range(steps)]
    return model, batches


def optimizer_and_schedule(model, steps):
    optimizer = build_optimizer(model, "adamw", weight_decay=0.01, lr=LR)
    return optimizer, build_scheduler(optimizer, "cosine", WARMUP, steps)


def run_plain(model, batches) -> float:
    optimizer, scheduler = optimizer_and_schedule(model, len(batches))
    model.train()
    start = time.perf_counter()
    for batch in batches:
        loss_sum, _ = lm_loss(model, batch)
        (loss_sum / batch["num_items"]).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def run_toolkit(model, batches) -> float:
    accelerator = Accelerator(step_scheduler_with_optimizer=False)
    optimizer, scheduler = optimizer_and_schedule(model, len(batches))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    settings = LoopSettings(max_steps=len(batches), max_grad_norm=MAX_NORM, logging_steps=len(batches))
    start = time.perf_counter()
    train(accelerator, model, optimizer, scheduler, iter(batches), lm_loss, settings)
    return time.perf_counter() - start


class _LossModel(torch.nn.Module):
    """Trainer wants forward(**batch) -> loss; same mean-per-token loss as the others."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, labels, attention_mask, num_items, num_samples=None, audio_seconds=None):
        loss_sum, _ = lm_loss(self.model, {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask})
        return {"loss": loss_sum / num_items}


def run_trainer(model, batches) -> float:
    from transformers import Trainer, TrainingArguments

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            max_steps=len(batches),
            per_device_train_batch_size=1,
            learning_rate=LR,
            weight_decay=0.01,
            warmup_steps=WARMUP,
            lr_scheduler_type="cosine",
            max_grad_norm=MAX_NORM,
            logging_steps=len(batches),
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            use_cpu=True,
            dataloader_num_workers=0,
            optim="adamw_torch",
            seed=0,
        )
        trainer = Trainer(model=_LossModel(model), args=args, train_dataset=batches, data_collator=lambda xs: xs[0])
        start = time.perf_counter()
        trainer.train()
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model_size", default="tiny")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    model, batches = make_batches(args.steps, args.batch_size, args.model_size)
    contenders = {"plain": run_plain, "toolkit": run_toolkit, "trainer": run_trainer}
    times: dict[str, list[float]] = {name: [] for name in contenders}
    run_plain(copy.deepcopy(model), batches[:5])  # warm-up: allocator, kernels
    for _ in range(args.rounds):
        for name, run in contenders.items():
            times[name].append(run(copy.deepcopy(model), batches))
    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"{args.steps} steps x batch {args.batch_size}, model {args.model_size}, {args.rounds} rounds (median)")
    for name in contenders:
        print(
            f"  {name:8s} ratio to plain: {median[name] / median['plain']:.3f}   (all rounds: "
            + ", ".join(f"{t / median['plain']:.3f}" for t in times[name])
            + ")"
        )


if __name__ == "__main__":
    main()
