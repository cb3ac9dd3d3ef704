"""Text conditions for every text-conditioned family: each clip's description, token ids or the frozen text encoder's
outputs computed once, the null condition of classifier-free guidance, and its per-example dropout."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import datasets
import numpy as np
import torch

from hf_audio_trainer.errors import ConfigError, check

STATES, IDS = "text_states", "text_ids"  # a row's cached text encoder outputs [tokens, d_model], or its token ids


def text_of(text_cfg, split: datasets.Dataset, name: str) -> list[str]:
    """Each row's description: --instance_prompt when given (every clip the same, as DreamBooth does), else the text
    column (`text_cfg`: the text section)."""
    if text_cfg.instance_prompt is not None:
        return [text_cfg.instance_prompt] * len(split)
    if text_cfg.text_column in split.column_names:
        return ["" if v is None else str(v).strip() for v in split[text_cfg.text_column]]
    raise ConfigError(
        f"the {name} split has no text column {text_cfg.text_column!r} (columns: {split.column_names}); name it with "
        "--text_column, or give every clip one description with --instance_prompt"
    )


def add_states(dataset: datasets.Dataset, states: list[np.ndarray]) -> datasets.Dataset:
    """`dataset` with the encoder outputs of its rows as the STATES column, float32 (Arrow would infer float64)."""
    feature = datasets.List(datasets.List(datasets.Value("float32")))
    return dataset.add_column(STATES, [x.tolist() for x in states], feature=feature)


@torch.no_grad()
def encode_texts(encoder: torch.nn.Module, ids: list[list[int]], device, batch_size: int = 64) -> list[np.ndarray]:
    """The frozen text encoder's last hidden states of each token sequence ([tokens, d_model], float32)."""
    encoder = encoder.to(device).eval()
    out: list[np.ndarray] = []
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        width = max(1, max(len(x) for x in chunk))
        tokens = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for i, x in enumerate(chunk):
            tokens[i, : len(x)], mask[i, : len(x)] = torch.tensor(x, dtype=torch.long), 1
        states = encoder(input_ids=tokens.to(device), attention_mask=mask.to(device)).last_hidden_state.float()
        out.extend(states[i, : len(x)].cpu().numpy() for i, x in enumerate(chunk))
    return out


def dropped(seed: int, epoch: int, row: int, probability: float) -> bool:
    """Whether this draw of `row` trains the null condition: a pure function of (seed, epoch, row), so a resumed run
    drops exactly the examples a straight one does, and each epoch drops others."""
    return probability > 0 and np.random.default_rng([seed, epoch, row, 0x7E47]).random() < probability


class TextCollator:
    """Batches of another collator (the codes' `CodesCollator`) with each example's text condition: the cached
    encoder states (`encoder_states` [batch, tokens, d]) or token ids (`text_ids`), and `text_mask`.

    The null condition is zero states with a zero mask: exactly the unconditional branch that transformers'
    `generate(guidance_scale > 1)` builds. A row drawn for dropout (`condition_dropout`, per example), a row
    without text, and every row with `null=True` (the `eval/loss_uncond` pass) get it.
    """

    def __init__(self, inner, cached: bool, dropout: float = 0.0, seed: int = 0, null: bool = False):
        self.inner, self.cached, self.dropout, self.seed, self.null = inner, cached, dropout, seed, null

    def __call__(self, examples: list[dict]) -> dict:
        batch = self.inner(examples)
        key = STATES if self.cached else IDS
        texts = [np.asarray(ex[key], dtype=np.float32 if self.cached else np.int64) for ex in examples]
        keep = [
            not self.null and len(x) > 0
            and not ("row" in ex and dropped(self.seed, ex["epoch"], ex["row"], self.dropout))
            for ex, x in zip(examples, texts, strict=True)
        ]  # fmt: skip
        width = max(1, max(len(x) for x in texts))
        mask = torch.zeros(len(examples), width, dtype=torch.long)
        if self.cached:
            dim = next((x.shape[1] for x in texts if x.ndim == 2 and len(x)), 1)
            values = torch.zeros(len(examples), width, dim)
        else:
            values = torch.zeros(len(examples), width, dtype=torch.long)
        for i, (x, k) in enumerate(zip(texts, keep, strict=True)):
            if k:
                values[i, : len(x)], mask[i, : len(x)] = torch.from_numpy(x), 1
        batch["encoder_states" if self.cached else "text_ids"] = values
        batch["text_mask"] = mask
        batch["sample_stats"] = {**batch.get("sample_stats", {}), "null_condition": float(len(keep) - sum(keep))}
        return batch


def conditioning(batch: dict) -> dict:
    """The composite's text inputs for a batch: precomputed encoder outputs, or ids the text encoder reads."""
    if "encoder_states" in batch:
        return {"encoder_outputs": (batch["encoder_states"],), "attention_mask": batch["text_mask"]}
    return {"input_ids": batch["text_ids"], "attention_mask": batch["text_mask"]}


class TextPairCollator:
    """A batch of B preference pairs (a text `prompt`, `chosen_codes`, `rejected_codes`) as 2B sequences, chosen
    first, each conditioned on its pair's prompt; `num_items` is the number of pairs (the loop averages per pair)."""

    def __init__(self, inner):
        self.text = TextCollator(inner, cached=True)

    def __call__(self, rows: list[dict]) -> dict:
        sequences = [{"codes": r[f"{side}_codes"], STATES: r[STATES]} for side in ("chosen", "rejected") for r in rows]
        batch = self.text(sequences)
        batch.pop("sample_stats")
        k = len(rows[0]["chosen_codes"])
        batch["response_tokens"] = torch.tensor([len(s["codes"][0]) * k for s in sequences], dtype=torch.float32)
        batch["num_items"] = batch["num_samples"] = len(rows)
        for side in ("chosen", "rejected"):
            if f"ref_{side}_logps" in rows[0]:
                batch[f"ref_{side}_logps"] = torch.tensor([r[f"ref_{side}_logps"] for r in rows], dtype=torch.float32)
        return batch


@dataclass
class TextConfig:
    """Text conditioning: the descriptions, the text encoder, classifier-free guidance."""

    # what a family without this section says to one of its flags
    refusal: ClassVar[str] = "{flags}: the {family} family takes no text; use --model_family {owner}"

    text_column: str = field(
        default="description", metadata={"help": "Column with each clip's description (also a metadata.csv column)."}
    )
    instance_prompt: str | None = field(
        default=None,
        metadata={"help": "One description for every clip (DreamBooth style; replaces the text column if any)."},
    )
    condition_dropout: float = field(
        default=0.1,
        metadata={"help": "Probability that a training example gets the null condition (classifier-free guidance)."},
    )
    guidance_scale: float = field(
        default=3.0, metadata={"help": "Classifier-free guidance of in-loop samples and of the export (1: none)."}
    )
    train_text_encoder: bool = field(
        default=False, metadata={"help": "Train the text encoder too (default: frozen, its outputs computed once)."}
    )
    max_text_tokens: int = field(default=128, metadata={"help": "Descriptions are cut to this many text tokens."})
    clap_model: str | None = field(
        default=None,
        metadata={
            "help": "A ClapModel (folder or Hub id, e.g. laion/clap-htsat-unfused): log eval/clap_score, the "
            "text-audio similarity of in-loop samples to their prompts."
        },
    )

    def __post_init__(self) -> None:
        check(bool(self.text_column), "text_column must be a column name")
        check(0.0 <= self.condition_dropout < 1.0, f"condition_dropout={self.condition_dropout}: must be in [0, 1)")
        check(self.guidance_scale >= 1.0, f"guidance_scale={self.guidance_scale}: must be >= 1 (1 is no guidance)")
        check(self.max_text_tokens >= 1, f"max_text_tokens={self.max_text_tokens}: must be >= 1")
