"""Preference alignment: the DPO family of losses on per-example sequence log-probabilities.

The losses follow TRL's ``DPOTrainer.dpo_loss``. Each takes the margin by which the policy prefers the chosen
continuation over the rejected one, relative to the frozen reference model::

    logits = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected)

and returns one loss per example; the caller reduces (usually a mean over the batch).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from datasets import Dataset

from hf_audio_trainer.data.audio import decode_audio
from hf_audio_trainer.data.codes import CodesCollator, one_thread_in_workers
from hf_audio_trainer.errors import ConfigError, check


def _sigmoid(logits: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """DPO (Rafailov et al. 2023); label smoothing gives conservative DPO (cDPO), for labels flipped with rate eps."""
    return -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing


def _robust(logits: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """Robust DPO (Chowdhury et al. 2024): an unbiased estimate of the clean-label loss under label noise eps."""
    return (-F.logsigmoid(beta * logits) * (1 - label_smoothing) + F.logsigmoid(-beta * logits) * label_smoothing) / (
        1 - 2 * label_smoothing
    )


def _hinge(logits: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """SLiC's hinge loss (Zhao et al. 2023): zero once the margin beta * logits reaches 1."""
    return torch.relu(1 - beta * logits)


def _ipo(logits: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """IPO (Azar et al. 2023): regress the margin onto 1 / (2 beta) instead of pushing it to infinity."""
    return (logits - 1 / (2 * beta)) ** 2


LOSS_TYPES = {"sigmoid": _sigmoid, "robust": _robust, "hinge": _hinge, "ipo": _ipo}
# Label smoothing models noisy preference labels; only these losses have a term for it.
SMOOTHED_LOSS_TYPES = ("sigmoid", "robust")


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example DPO-family losses and the implicit rewards of the chosen and rejected continuations.

    Args:
        policy_chosen_logps: 1-D ``(batch,)`` summed log-probabilities of the chosen continuations under the
            policy; the other three are the same for the rejected continuations and the reference model. For
            ``ipo`` pass length-averaged log-probabilities (sum divided by the number of tokens), as the IPO paper
            and TRL do: its target margin 1 / (2 beta) does not scale with sequence length.
        beta: strength of the KL penalty to the reference model (smaller lets the policy drift further).
        loss_type: one of ``LOSS_TYPES``.
        label_smoothing: assumed rate of flipped preference labels, in [0, 0.5); ``sigmoid`` and ``robust`` only.

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each float32 ``(batch,)``; the rewards are
        ``beta * (policy - reference)`` and carry no gradient.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {list(LOSS_TYPES)}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing and loss_type not in SMOOTHED_LOSS_TYPES:
        raise ValueError(
            f"label_smoothing={label_smoothing} has no effect with loss_type {loss_type!r}: it only applies to "
            f"{list(SMOOTHED_LOSS_TYPES)}; set it to 0"
        )
    logps = (policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    shapes = [tuple(t.shape) for t in logps]
    if len(set(shapes)) != 1 or len(shapes[0]) != 1:
        raise ValueError(
            "policy_chosen, policy_rejected, reference_chosen and reference_rejected log-probabilities must be "
            f"1-D tensors of the same shape (one value per example), got shapes {shapes}"
        )
    # bf16 has ~3 significant digits: the difference of two summed log-probs of a long sequence would be noise.
    policy_chosen, policy_rejected, reference_chosen, reference_rejected = (t.float() for t in logps)
    logits = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected)
    losses = LOSS_TYPES[loss_type](logits, beta, label_smoothing)
    chosen_rewards = beta * (policy_chosen - reference_chosen).detach()
    rejected_rewards = beta * (policy_rejected - reference_rejected).detach()
    return losses, chosen_rewards, rejected_rewards


# --- the model side: preference batches, sequence log-probabilities, the objective the loop minimises ---


def tokenize_preferences(dataset, tokenizer, max_duration_seconds: float, num_proc: int | None = None, split="train"):
    """`prompt_codes` (may be empty), `chosen_codes`, `rejected_codes` ([codebooks][frames]) from audio columns.

    Pre-tokenized `*_codes` columns are kept as they are. Prompt and response are encoded separately, so the
    response's codes do not depend on the prompt's last partial frame.
    """
    if {"chosen_codes", "rejected_codes"} <= set(dataset.column_names):
        if "prompt_codes" not in dataset.column_names:
            empty = [[] for _ in range(tokenizer.num_codebooks)]
            dataset = dataset.add_column("prompt_codes", [empty] * len(dataset))
        return dataset.select_columns(["prompt_codes", "chosen_codes", "rejected_codes"])
    max_samples = int(max_duration_seconds * tokenizer.sample_rate)

    def encode(batch: dict, indices: list[int]) -> dict:
        one_thread_in_workers()
        out = {}
        for column in ("prompt", "chosen", "rejected"):
            if column not in batch:  # no prompt: unconditional preference pairs
                out["prompt_codes"] = [[[] for _ in range(tokenizer.num_codebooks)] for _ in indices]
                continue
            waves = [
                decode_audio(value, tokenizer.sample_rate, where=f"{split} row {i} {column}")[:max_samples]
                for value, i in zip(batch[column], indices, strict=True)
            ]
            codes = tokenizer.encode_batch(waves)
            out[f"{column}_codes"] = [c.to(torch.int16).tolist() for c in codes]
        return out

    encoded = dataset.map(
        encode,
        batched=True,
        batch_size=32,
        with_indices=True,
        remove_columns=dataset.column_names,
        num_proc=num_proc,
        desc=f"Tokenizing {split} pairs",
    )
    for column in ("chosen_codes", "rejected_codes"):
        if any(len(codes[0]) == 0 for codes in encoded[column]):
            raise ConfigError(f"some {split} '{column[:-6]}' clips are shorter than one tokenizer frame; remove them")
    return encoded


class PreferenceCollator:
    """A batch of B pairs as 2B sequences prompt + response (chosen first), the prompt's targets masked.

    `num_items` is the number of pairs, so the loop averages the DPO loss and its metrics per pair.
    """

    def __init__(self, codes_collator: CodesCollator):
        self.codes = codes_collator

    def __call__(self, rows: list[dict]) -> dict:
        sequences = []
        for side in ("chosen", "rejected"):
            for row in rows:
                prompt = row["prompt_codes"]
                codes = [list(p) + list(r) for p, r in zip(prompt, row[f"{side}_codes"], strict=True)]
                sequences.append({"codes": codes, "prompt_frames": len(prompt[0])})
        batch = self.codes(sequences)
        batch["response_tokens"] = torch.tensor(
            [(len(s["codes"][0]) - s["prompt_frames"]) * len(s["codes"]) for s in sequences], dtype=torch.float32
        )
        batch["num_items"] = batch["num_samples"] = len(rows)
        for side in ("chosen", "rejected"):
            if f"ref_{side}_logps" in rows[0]:
                batch[f"ref_{side}_logps"] = torch.tensor([r[f"ref_{side}_logps"] for r in rows], dtype=torch.float32)
        return batch


def sequence_logps(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Sum of the log-probabilities of each sequence's unmasked targets (the response codes): shape (sequences,)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    labels = batch["labels"]
    mask = labels != -100
    token_logps = torch.gather(logits.log_softmax(-1), -1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    per_row = (token_logps * mask).sum(-1)  # rows are (sequence, codebook) pairs
    return per_row.view(-1, batch["input_ids"].shape[0] // batch["attention_mask"].shape[0]).sum(-1)


class DPOObjective:
    """loss_fn(model, batch) for the loop: summed DPO losses, and TRL's metrics as per-pair sums.

    `logps(model, batch)` gives each sequence's log-probability (chosen rows first): the model family's.
    """

    def __init__(
        self,
        beta: float,
        loss_type: str,
        label_smoothing: float,
        reference: torch.nn.Module | None,
        logps: Callable[[torch.nn.Module, dict], torch.Tensor] | None = None,
    ):
        self.beta, self.loss_type, self.label_smoothing, self.reference = beta, loss_type, label_smoothing, reference
        self.logps = logps or sequence_logps

    def reference_logps(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if "ref_chosen_logps" in batch:  # precomputed once before training
            return batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        with torch.no_grad():
            return self.logps(self.reference, batch).chunk(2)

    def __call__(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        chosen, rejected = self.logps(model, batch).chunk(2)
        ref_chosen, ref_rejected = self.reference_logps(batch)
        if self.loss_type == "ipo":  # IPO is defined on length-averaged log-probabilities
            tokens_chosen, tokens_rejected = batch["response_tokens"].chunk(2)
            chosen, rejected = chosen / tokens_chosen, rejected / tokens_rejected
            ref_chosen, ref_rejected = ref_chosen / tokens_chosen, ref_rejected / tokens_rejected
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            chosen, rejected, ref_chosen, ref_rejected, self.beta, self.loss_type, self.label_smoothing
        )
        metrics = {
            "rewards/chosen": chosen_rewards.sum(),
            "rewards/rejected": rejected_rewards.sum(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum(),
            "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
            "logps/chosen": chosen.detach().sum(),
            "logps/rejected": rejected.detach().sum(),
        }
        return losses.sum(), metrics


@torch.no_grad()
def precompute_reference_logps(
    reference: torch.nn.Module, dataset, collate: Callable, device, batch_size: int = 16, logps: Callable | None = None
):
    """Add `ref_chosen_logps` / `ref_rejected_logps` columns, so the reference need not stay in memory (`logps`: the
    family's per-sequence log-probabilities, default the decoder-only MusicGen's)."""
    reference.eval()
    chosen, rejected = [], []
    for start in range(0, len(dataset), batch_size):
        batch = collate(dataset.select(range(start, min(start + batch_size, len(dataset)))).to_list())
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        c, r = (logps or sequence_logps)(reference, batch).chunk(2)
        chosen += c.tolist()
        rejected += r.tolist()
    return dataset.add_column("ref_chosen_logps", chosen).add_column("ref_rejected_logps", rejected)


SplitsT = TypeVar("SplitsT")


def with_reference_logps(
    data: SplitsT,
    reference: torch.nn.Module,
    collate: Callable,
    columns: list[str],
    accelerator: Accelerator,
    logps: Callable[[torch.nn.Module, dict], torch.Tensor],
) -> SplitsT:
    """`data` (a dataclass with `train` and `validation` splits) with each split cut to `columns` and the reference's
    log-probabilities added as columns, computed once under autocast (then only the policy stays in memory)."""
    with accelerator.autocast():
        splits = {
            name: precompute_reference_logps(
                reference, getattr(data, name).select_columns(columns), collate, accelerator.device, logps=logps
            )
            for name in ("train", "validation")
        }
    return dataclasses.replace(data, **splits)


# --- on-policy pairs: sample continuations, rank them with a scorer (the RLHF-style loop for audio) ---


def tonal_clarity(audio: np.ndarray, sample_rate: int) -> float:
    """A preference score for clean, pitched audio: minus the mean spectral flatness of its frames.

    Spectral flatness (geometric over arithmetic mean of the power spectrum) is ~1 for white noise and ~0 for a
    tone, so noise, clipping distortion and smeared pitch all lower the score. Silent frames are ignored.
    """
    audio = np.asarray(audio, dtype=np.float64)
    frame = max(256, int(0.032 * sample_rate))
    if len(audio) < frame:
        raise ValueError(f"tonal_clarity needs at least {frame} samples, got {len(audio)}")
    frames = np.lib.stride_tricks.sliding_window_view(audio, frame)[:: frame // 2] * np.hanning(frame)
    power = np.abs(np.fft.rfft(frames, axis=-1)) ** 2 + 1e-12
    loud = power.sum(-1) > 1e-6 * power.sum(-1).max()
    flatness = np.exp(np.log(power[loud]).mean(-1)) / power[loud].mean(-1)
    return -float(flatness.mean())


@torch.no_grad()
def generate_continuations(
    model, prompt_codes: torch.Tensor, num_frames: int, num_samples: int = 1, temperature: float = 1.0
) -> list[torch.Tensor]:
    """Sample `num_samples` continuations of `num_frames` code frames after a prompt [codebooks, frames].

    Uses MusicGen's own `generate` (which applies and reverts the delay pattern); returns new codes only.
    """
    from transformers import GenerationConfig

    k, prompt_len = prompt_codes.shape
    bos = model.config.bos_token_id
    device = next(model.parameters()).device
    rows = torch.cat([torch.full((k, 1), bos), prompt_codes.long().cpu()], -1)  # BOS, then the prompt
    input_ids = rows.repeat(num_samples, 1).to(device)  # (samples * codebooks, 1 + prompt)
    config = GenerationConfig(
        max_new_tokens=num_frames + k - 1,  # the delay pattern needs k - 1 more steps to finish every codebook
        do_sample=True,
        temperature=temperature,
        pad_token_id=bos,
        bos_token_id=bos,
        decoder_start_token_id=bos,
        num_return_sequences=1,
    )
    was_training = model.training
    model.eval()
    out = model.generate(input_ids=input_ids, generation_config=config)  # (samples, codebooks, frames)
    model.train(was_training)
    return [sample[:, prompt_len : prompt_len + num_frames].cpu() for sample in out]


def make_preference_pairs(
    model,
    prompts: list[np.ndarray],
    scorer: Callable[[np.ndarray, int], float] = tonal_clarity,
    num_samples: int = 4,
    *,
    tokenizer,
    seconds: float = 1.0,
    temperature: float = 1.0,
) -> Dataset:
    """On-policy preference pairs: for each prompt, sample `num_samples` continuations from the model, decode and
    score them, and keep the best as `chosen` and the worst as `rejected` (pre-tokenized `*_codes` columns, ready
    for `align`). Prompts whose samples all score the same give no preference and are left out.
    """
    if num_samples < 2:
        raise ConfigError(f"num_samples={num_samples}: need at least 2 continuations per prompt to rank")
    num_frames = max(1, round(seconds * tokenizer.frame_rate))
    rows = []
    for prompt in prompts:
        prompt_codes = tokenizer.encode(prompt)
        samples = generate_continuations(model, prompt_codes, num_frames, num_samples, temperature)
        scores = [
            scorer(tokenizer.decode(torch.cat([prompt_codes, s], -1)).numpy(), tokenizer.sample_rate) for s in samples
        ]
        best, worst = int(np.argmax(scores)), int(np.argmin(scores))
        if scores[best] == scores[worst]:
            continue
        rows.append(
            {
                "prompt_codes": prompt_codes.tolist(),
                "chosen_codes": samples[best].tolist(),
                "rejected_codes": samples[worst].tolist(),
                "chosen_score": scores[best],
                "rejected_score": scores[worst],
            }
        )
    return Dataset.from_list(rows)


def mean_generation_score(
    model, tokenizer, prompts, scorer=tonal_clarity, seconds: float = 1.0, seed: int = 0
) -> float:
    """The scorer's mean over one sampled continuation per prompt (prompt + continuation decoded): how much a
    model's own generations have the preferred quality. Seeded, so two models are compared on equal draws."""
    torch.manual_seed(seed)
    num_frames = max(1, round(seconds * tokenizer.frame_rate))
    scores = []
    for prompt in prompts:
        prompt_codes = tokenizer.encode(prompt)
        (sample,) = generate_continuations(model, prompt_codes, num_frames, 1)
        scores.append(scorer(tokenizer.decode(torch.cat([prompt_codes, sample], -1)).numpy(), tokenizer.sample_rate))
    return float(np.mean(scores))


def rank_generations(
    prompts: list[str],
    generate: Callable[[list[str]], list[torch.Tensor]],
    decode: Callable[[torch.Tensor], np.ndarray],
    scorer: Callable[[list[np.ndarray], list[str]], np.ndarray],
    num_samples: int = 4,
) -> Dataset:
    """On-policy pairs from text prompts, as TangoFlux's CRPO makes them: `num_samples` generations per prompt
    (`generate(texts)` -> codes [codebooks, frames] each), decoded and scored against their prompt (`scorer(waves,
    texts)`, e.g. CLAP similarity), the best `chosen` and the worst `rejected` (TRL's columns, codes pre-tokenized).
    A prompt whose generations all score the same gives no preference and is left out."""
    if num_samples < 2:
        raise ConfigError(f"num_samples={num_samples}: need at least 2 generations per prompt to rank")
    rows = []
    for prompt in prompts:
        codes = generate([prompt] * num_samples)
        scores = np.asarray(scorer([decode(c) for c in codes], [prompt] * num_samples), dtype=np.float64)
        best, worst = int(np.argmax(scores)), int(np.argmin(scores))
        if scores[best] == scores[worst]:
            continue
        rows.append({
            "prompt": prompt, "chosen_codes": codes[best].tolist(), "rejected_codes": codes[worst].tolist(),
            "chosen_score": float(scores[best]), "rejected_score": float(scores[worst]),
        })  # fmt: skip
    return Dataset.from_list(rows)


@dataclass
class DPOConfig:
    """The preference objective (TRL's names)."""

    beta: float = field(default=0.1, metadata={"help": "Strength of the KL tie to the reference model."})
    loss_type: str = field(default="sigmoid", metadata={"help": "sigmoid (DPO), ipo, hinge or robust."})
    label_smoothing: float = field(
        default=0.0, metadata={"help": "Assumed label-noise rate for sigmoid (cDPO) and robust, in [0, 0.5)."}
    )
    precompute_ref_log_probs: bool = field(
        default=False,
        metadata={"help": "Compute the reference's log-probs once before training, so one model sits in memory."},
    )
    ref_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Reference model; unset: a frozen copy of the starting policy."}
    )

    def __post_init__(self) -> None:
        check(self.beta > 0, f"beta={self.beta}: must be > 0")
        check(self.loss_type in LOSS_TYPES, f"loss_type={self.loss_type!r}: choose one of {list(LOSS_TYPES)}")
        check(0 <= self.label_smoothing < 0.5, f"label_smoothing={self.label_smoothing}: must be in [0, 0.5)")
        check(
            self.label_smoothing == 0 or self.loss_type in ("sigmoid", "robust"),
            f"label_smoothing applies to the sigmoid and robust losses, not {self.loss_type}",
        )
