"""Does the codec's adversarial game stay balanced? A short default codec run on the embedded synthetic data.

Prints the curve every `logging_steps`: step, reconstruction mel distance (train segments; validation clips at
evaluations), the discriminator's accuracy on real / generated audio and their mean, and the D and G adversarial
losses with their ratio. A healthy run: the mel distance falls, and the accuracy stays between the extremes (0.5: the
discriminator is fooled or guessing; 1.0: it wins outright and its gradient stops helping the generator).

    python benchmarks/codec_balance.py                # 5-7 minutes on a shared 2-core CPU machine
    python benchmarks/codec_balance.py --max_steps 400 --adversarial_loss_type hinge
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from hf_audio_trainer import train_codec
from hf_audio_trainer.trackers import read_metrics

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "recipes" / "configs" / "codec.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max_steps", type=int, default=200)
    parser.add_argument("--per_device_train_batch_size", type=int, default=8)
    parser.add_argument("--discriminator_start_step", type=int, default=50)
    parser.add_argument("--adversarial_loss_type", default=None, help="default: the YAML's (lsgan)")
    parser.add_argument("--discriminator_learning_rate", type=float, default=None, help="default: the YAML's")
    parser.add_argument("--logging_steps", type=int, default=10)
    parser.add_argument("--eval_steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default=None, help="default: a temporary folder")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1, like `accelerate launch`: steadier when shared)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from hf_audio_trainer.config import load_yaml

    output_dir = args.output_dir or tempfile.mkdtemp(prefix="codec-balance-")
    overrides = {
        **load_yaml(DEFAULT_CONFIG),
        **{k: v for k, v in vars(args).items() if k not in ("output_dir", "threads") and v is not None},
        "output_dir": output_dir,
        "overwrite_output_dir": True,
        "report_to": "none",
        "save_steps": args.max_steps,
    }
    start = time.perf_counter()
    train_codec(overrides)
    elapsed = time.perf_counter() - start

    rows = read_metrics(output_dir)
    evals = {r["step"]: r["eval/mel_distance"] for r in rows if "eval/mel_distance" in r}
    print(
        f"\n{args.max_steps} steps in {elapsed / 60:.1f} min; discriminator from step {args.discriminator_start_step}"
    )
    header = ("step", "mel(train)", "mel(val)", "acc_real", "acc_fake", "acc", "D loss", "G adv", "D/G")
    print("".join(f"{h:>11}" for h in header))
    accs = []
    for r in rows:
        if "train/mel_distance" not in r:
            continue
        val = evals.get(r["step"])
        cells = [r["step"], r["train/mel_distance"], val]
        if "train/d_acc" in r:
            cells += [r["train/d_acc_real"], r["train/d_acc_fake"], r["train/d_acc"], r["train/d_loss"]]
            cells += [r.get("train/g_adv_loss"), r["train/d_g_loss_ratio"]]
            accs.append(r["train/d_acc"])
        print("".join(f"{c:>11}" if isinstance(c, int) else f"{'':>11}" if c is None else f"{c:>11.3f}" for c in cells))
    steps = sorted(evals)
    if len(steps) > 1:
        first, last = evals[steps[0]], evals[steps[-1]]
        print(f"validation mel distance {first:.3f} (step {steps[0]}) -> {last:.3f} (step {steps[-1]}), "
              f"{100 * (last - first) / first:+.1f}%")  # fmt: skip
    if accs:
        print(f"discriminator accuracy (mean of real and fake) after its start: min {min(accs):.3f}, "
              f"max {max(accs):.3f}, last {accs[-1]:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
