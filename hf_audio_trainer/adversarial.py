"""Adversarial training: discriminators, GAN and feature-matching losses, discriminator accuracy, and the loop that
alternates discriminator and generator steps.

Every loss here is a per-clip value, summed over the clips of a micro-batch; the loop divides by the clips of the
whole optimizer step (all micro-batches, all processes), so micro-batch x accumulation x processes gives the same
update as one big batch, for both networks.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.nn.utils.parametrizations import weight_norm

from hf_audio_trainer.errors import ConfigError, check
from hf_audio_trainer.loop import StepOutput, to_device

LEAK = 0.1  # LeakyReLU slope of HiFi-GAN / EnCodec discriminators

# --------------------------------------------------------------------------------------------------------------------
# Discriminators: forward(audio [B, 1, T]) -> list of (logits [B, ...], features [list of [B, ...]]), one per head
# --------------------------------------------------------------------------------------------------------------------


class STFTDiscriminator(torch.nn.Module):
    """One scale of EnCodec's multi-scale STFT discriminator: 2-D convs over the complex spectrogram (real, imag)."""

    def __init__(self, n_fft: int, channels: int = 16):
        super().__init__()
        self.n_fft, self.hop = n_fft, n_fft // 4
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        dilations = (1, 2, 4)
        self.convs = torch.nn.ModuleList(
            [weight_norm(torch.nn.Conv2d(2, channels, (3, 9), padding=(1, 4)))]
            + [
                # dilated in time, strided in frequency (EnCodec's layout)
                weight_norm(torch.nn.Conv2d(channels, channels, (3, 9), stride=(1, 2), dilation=(d, 1), padding=(d, 4)))
                for d in dilations
            ]
            + [weight_norm(torch.nn.Conv2d(channels, channels, (3, 3), padding=(1, 1)))]
        )
        self.out = weight_norm(torch.nn.Conv2d(channels, 1, (3, 3), padding=(1, 1)))

    def forward(self, audio: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        spec = torch.stft(
            audio.float().flatten(0, 1), self.n_fft, self.hop, window=self.window, center=True,
            pad_mode="constant", return_complex=True,
        )  # fmt: skip
        x = torch.view_as_real(spec).permute(0, 3, 2, 1)  # [B, 2 (real, imag), frames, freq]
        features = []
        for conv in self.convs:
            x = F.leaky_relu(conv(x), LEAK)
            features.append(x)
        return self.out(x), features


class PeriodDiscriminator(torch.nn.Module):
    """One period of HiFi-GAN's multi-period discriminator: 2-D convs over the waveform folded into [T / p, p]."""

    def __init__(self, period: int, channels: int = 16):
        super().__init__()
        self.period = period
        sizes = [1, channels, channels * 2, channels * 4]
        self.convs = torch.nn.ModuleList(
            [
                weight_norm(torch.nn.Conv2d(a, b, (5, 1), stride=(3, 1), padding=(2, 0)))
                for a, b in zip(sizes, sizes[1:], strict=False)
            ]
            + [weight_norm(torch.nn.Conv2d(sizes[-1], sizes[-1], (5, 1), padding=(2, 0)))]
        )
        self.out = weight_norm(torch.nn.Conv2d(sizes[-1], 1, (3, 1), padding=(1, 0)))

    def forward(self, audio: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        b, c, t = audio.shape
        pad = -t % self.period
        x = F.pad(audio, (0, pad), mode="reflect" if pad < t else "constant").view(b, c, -1, self.period)
        features = []
        for conv in self.convs:
            x = F.leaky_relu(conv(x), LEAK)
            features.append(x)
        return self.out(x), features


# name -> builder(sizes, channels): a head per STFT size (msstft) or per period (mpd)
DISCRIMINATORS = {
    "msstft": lambda sizes, channels: [STFTDiscriminator(n, channels) for n in sizes],
    "mpd": lambda sizes, channels: [PeriodDiscriminator(p, channels) for p in sizes],
}


class Discriminators(torch.nn.Module):
    """All heads as one module, so one optimizer, one DDP wrapper and one checkpoint entry hold them."""

    def __init__(self, kinds: dict[str, Sequence[int]], channels: int = 16):
        super().__init__()
        for kind in kinds:
            if kind not in DISCRIMINATORS:
                raise ValueError(f"unknown discriminator {kind!r}; choose from {sorted(DISCRIMINATORS)}")
        self.heads = torch.nn.ModuleList(
            h for kind, sizes in kinds.items() for h in DISCRIMINATORS[kind](sizes, channels)
        )

    def forward(self, audio: torch.Tensor) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
        return [head(audio) for head in self.heads]


def min_audio_samples(kinds: dict[str, Sequence[int]]) -> int:
    """The shortest input every head can take: the largest STFT window (the spectrogram must hold a full one)."""
    return max([*kinds.get("msstft", []), 1])


# --------------------------------------------------------------------------------------------------------------------
# Losses and accuracy: each head's per-clip value (mean over its output map), averaged over heads (EnCodec's 1/K)
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdversarialLoss:
    """d(real, fake) and g(fake) per clip [B] from one head's logits [B, ...]; `threshold` splits real from fake."""

    discriminator: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    generator: Callable[[torch.Tensor], torch.Tensor]
    threshold: float


def _per_clip(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(1)


ADVERSARIAL_LOSSES = {
    # hinge (EnCodec): D pushes real logits above 1 and fake below -1; G's term is bounded too, relu(1 - D(fake))
    "hinge": AdversarialLoss(
        discriminator=lambda real, fake: _per_clip(F.relu(1 - real)) + _per_clip(F.relu(1 + fake)),
        generator=lambda fake: _per_clip(F.relu(1 - fake)),
        threshold=0.0,
    ),
    # least squares (HiFi-GAN): targets 1 for real, 0 for fake
    "lsgan": AdversarialLoss(
        discriminator=lambda real, fake: _per_clip((real - 1).pow(2)) + _per_clip(fake.pow(2)),
        generator=lambda fake: _per_clip((fake - 1).pow(2)),
        threshold=0.5,
    ),
}


def discriminator_loss(real: list[torch.Tensor], fake: list[torch.Tensor], loss: AdversarialLoss) -> torch.Tensor:
    """Per-clip discriminator loss [B], averaged over heads."""
    return torch.stack([loss.discriminator(r, f) for r, f in zip(real, fake, strict=True)]).mean(0)


def generator_adversarial_loss(fake: list[torch.Tensor], loss: AdversarialLoss) -> torch.Tensor:
    """Per-clip generator adversarial loss [B], averaged over heads."""
    return torch.stack([loss.generator(f) for f in fake]).mean(0)


def feature_matching_loss(real: list[list[torch.Tensor]], fake: list[list[torch.Tensor]]) -> torch.Tensor:
    """Per-clip mean |D_l(real) - D_l(fake)| [B], averaged over layers and heads (MelGAN / HiFi-GAN).

    EnCodec divides by mean |D_l(real)| over the batch; that couples clips, so accumulation would no longer equal
    one big batch. The plain per-clip L1 keeps it exact.
    """
    per_head = [
        torch.stack([_per_clip((r.detach() - f).abs()) for r, f in zip(rs, fs, strict=True)]).mean(0)
        for rs, fs in zip(real, fake, strict=True)
    ]
    return torch.stack(per_head).mean(0)


@torch.no_grad()
def discriminator_accuracy(
    real: list[torch.Tensor], fake: list[torch.Tensor], threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-clip accuracy on real and on generated audio [B] each: the fraction of heads whose mean logit calls the
    clip real (> threshold) for real clips, and generated (<= threshold) for generated ones."""
    on_real = torch.stack([(_per_clip(r.float()) > threshold).float() for r in real]).mean(0)
    on_fake = torch.stack([(_per_clip(f.float()) <= threshold).float() for f in fake]).mean(0)
    return on_real, on_fake


@contextlib.contextmanager
def frozen(module: torch.nn.Module) -> Iterator[None]:
    """No gradients into `module`'s parameters (they still flow through it to its input)."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


# --------------------------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------------------------

# loss_fn(batch) -> (sum over the batch's clips of the loss, {stat name: sum over clips})
StepLossFn = Callable[[dict], tuple[torch.Tensor, dict[str, torch.Tensor]]]
# generator stats that only adversarial steps produce: averaged over those steps' clips, like the `d_` stats
ADVERSARIAL_TERMS = ("g_adv_loss", "feature_matching_loss")


@dataclass
class Player:
    """One network of the game with its own optimizer, schedule, loss scaler (fp16 only) and clipping."""

    name: str  # "g" or "d": the prefix of its logged metrics
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    max_grad_norm: float = 1.0
    scaler: torch.amp.GradScaler | None = None
    # state the step updates outside the optimizer (the codec's EMA codebooks), called with whether it stepped
    after_step: Callable[[bool], None] | None = None


def update(
    accelerator: Accelerator, player: Player, micro_batches: list[dict], loss_fn: StepLossFn, items: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """Accumulate one network's gradient over the step's micro-batches; returns (summed stats, loss sum, grad norm).

    accelerate's `accumulate` and `sync_gradients` follow one model (accelerate #1414, diffusers #4046), so with two
    networks the accumulation is spelled out: DDP's all-reduce is skipped on every micro-batch but the last, and the
    loss is divided by the clips of the whole step here, not by a count of micro-batches.
    """
    world, accum = accelerator.num_processes, accelerator.gradient_accumulation_steps
    stats: dict[str, torch.Tensor] = {}
    total = torch.zeros((), device=accelerator.device)
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(player.model):
            loss_sum, extras = loss_fn(to_device(batch, accelerator.device))
            # DDP averages over processes, so scale by world to get d(sum of losses) / (clips of the whole step)
            loss = loss_sum * world / items
            if player.scaler is not None:  # this network's own loss scale (accelerate keeps one for all models)
                player.scaler.scale(loss).backward()
            else:
                accelerator.backward(loss * accum)  # accelerate divides by its accumulation count: undo it
        total += loss_sum.detach().float()
        for name, value in extras.items():
            stats[name] = stats.get(name, 0.0) + value.detach().float()
    params = [p for p in player.model.parameters() if p.requires_grad]
    if player.scaler is not None:
        player.scaler.unscale_(player.optimizer)  # clip the true gradient, with this network's scale
        norm = torch.nn.utils.clip_grad_norm_(params, player.max_grad_norm or float("inf"))
    else:
        norm = accelerator.clip_grad_norm_(params, player.max_grad_norm or float("inf"))
    return norm, stats, total


def step_player(player: Player, grad_norm_finite: bool) -> bool:
    """Apply the accumulated gradient; returns whether the update happened (a non-finite step is skipped whole:
    parameters, optimizer state and schedule untouched)."""
    stepped = grad_norm_finite
    if player.scaler is not None:  # the scaler skips overflowing steps itself and lowers its scale when it does
        before = player.scaler.get_scale()
        player.scaler.step(player.optimizer)
        player.scaler.update()
        stepped = player.scaler.get_scale() >= before
    elif stepped:
        player.optimizer.step()
    if stepped:
        player.scheduler.step()
    if player.after_step is not None:
        player.after_step(stepped)
    player.optimizer.zero_grad(set_to_none=True)
    return stepped


class AdversarialStep:
    """One step of the game for `loop.train`: a discriminator update, then a generator update on the same batch.

    From `discriminator_start_step` on, a step first trains the discriminator on real segments against the
    generator's current reconstructions (computed without a graph), then trains the generator against the updated
    discriminator (`generator_loss(batch, adversarial=True)`); before it, only the generator's reconstruction
    losses train. Each network accumulates, clips, skips non-finite steps and steps on its own; the step reports the
    generator's update as the one the loop counts (and the EMA follows).
    """

    def __init__(
        self,
        accelerator: Accelerator,
        generator: Player,
        discriminator: Player,
        generator_loss: Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]],
        discriminator_loss_fn: StepLossFn,
        discriminator_start_step: int = 0,
    ):
        self.accelerator, self.generator, self.discriminator = accelerator, generator, discriminator
        self.generator_loss, self.discriminator_loss = generator_loss, discriminator_loss_fn
        self.discriminator_start_step = discriminator_start_step
        self.skipped = {"g": 0, "d": 0}
        self.g_norm: torch.Tensor | None = None
        self.d_norm: torch.Tensor | None = None
        discriminator.model.train()

    def __call__(self, step: int, micro_batches: list[dict], items: float) -> StepOutput:
        clips = float(sum(b["num_items"] for b in micro_batches))  # this process's
        sums: dict[str, tuple[torch.Tensor, str]] = {}
        counts = {"g": clips}
        adversarial = step >= self.discriminator_start_step
        self.d_norm = None
        if adversarial:
            self.d_norm, d_stats, d_total = update(
                self.accelerator, self.discriminator, micro_batches, self.discriminator_loss, items
            )
            # one host sync: the generator must train against the discriminator as updated (or not) here
            d_stepped = step_player(self.discriminator, bool(torch.isfinite(self.d_norm)))
            sums.update({name: (value, "d") for name, value in {"d_loss": d_total, **d_stats}.items()})
            counts["d"] = clips
            self.skipped["d"] += not d_stepped
        g_loss = functools.partial(self.generator_loss, adversarial=adversarial)
        self.g_norm, g_stats, g_total = update(self.accelerator, self.generator, micro_batches, g_loss, items)
        g_stepped = step_player(self.generator, bool(torch.isfinite(self.g_norm)))
        for name, value in {"g_loss": g_total, **g_stats}.items():
            # the adversarial terms exist on the steps that have them: averaged over those steps' clips, like d_
            sums[name] = (value, "d" if name in ADVERSARIAL_TERMS else "g")
        self.skipped["g"] += not g_stepped
        return StepOutput(g_stepped, sums, counts)

    def log(self, logged: dict[str, float]) -> dict[str, str]:
        if "train/d_acc_real" in logged:
            logged["train/d_acc"] = (logged["train/d_acc_real"] + logged["train/d_acc_fake"]) / 2
            # how the two sides of the game compare: near 1 when neither dominates (hinge: both ~1 at balance)
            logged["train/d_g_loss_ratio"] = logged["train/d_loss"] / max(logged.get("train/g_adv_loss", 0.0), 1e-8)
        logged["train/g_grad_norm"] = self.g_norm.item()
        logged["train/g_learning_rate"] = self.generator.scheduler.get_last_lr()[0]
        logged["train/g_skipped_steps"] = self.skipped["g"]
        if self.d_norm is not None:
            logged["train/d_grad_norm"] = self.d_norm.item()
            logged["train/d_learning_rate"] = self.discriminator.scheduler.get_last_lr()[0]
            logged["train/d_skipped_steps"] = self.skipped["d"]
        for player in (self.generator, self.discriminator):
            if player.scaler is not None:
                logged[f"train/{player.name}_loss_scale"] = player.scaler.get_scale()
        postfix = {"mel": f"{logged.get('train/mel_distance', float('nan')):.3f}"}
        if "train/d_acc" in logged:
            postfix["d_acc"] = f"{logged['train/d_acc']:.2f}"
        return postfix


# --------------------------------------------------------------------------------------------------------------------
# The codec stage's settings of the game
# --------------------------------------------------------------------------------------------------------------------


def int_list(value: str, name: str) -> list[int]:
    """A comma-separated list of positive integers (FFT sizes, periods), or a one-line error naming the flag."""
    try:
        values = [int(v) for v in str(value).split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{name}={value!r}: expected comma-separated integers, e.g. 512,256,128") from None
    check(bool(values) and all(v > 0 for v in values), f"{name}={value!r}: expected positive integers")
    return values


@dataclass
class DiscriminatorConfig:
    """The discriminators and their optimizer settings (the rest is shared with the generator's --optim flags)."""

    shapes_model: ClassVar[bool] = True  # the heads are the discriminator's weights: a resume must match

    discriminators: str = field(
        default="msstft", metadata={"help": "Comma-separated: msstft (multi-scale STFT), mpd (multi-period)."}
    )
    stft_discriminator_n_ffts: str = field(
        default="512,256,128", metadata={"help": "FFT sizes of the multi-scale STFT discriminator's heads."}
    )
    mpd_periods: str = field(default="2,3,5,7,11", metadata={"help": "Periods of the multi-period discriminator."})
    discriminator_channels: int = field(default=8, metadata={"help": "Conv channels of each discriminator head."})
    discriminator_learning_rate: float | None = field(
        default=None, metadata={"help": "The discriminator's peak learning rate; unset: --learning_rate."}
    )
    discriminator_max_grad_norm: float | None = field(
        default=None, metadata={"help": "The discriminator's gradient clipping; unset: --max_grad_norm; 0 disables."}
    )

    def __post_init__(self) -> None:
        kinds = [k.strip() for k in self.discriminators.split(",") if k.strip()]
        check(bool(kinds), "discriminators: name at least one of " + ", ".join(sorted(DISCRIMINATORS)))
        for kind in kinds:
            check(kind in DISCRIMINATORS, f"discriminators: unknown {kind!r}; choose from {sorted(DISCRIMINATORS)}")
        int_list(self.stft_discriminator_n_ffts, "stft_discriminator_n_ffts")
        int_list(self.mpd_periods, "mpd_periods")
        check(self.discriminator_channels >= 1, f"discriminator_channels={self.discriminator_channels}: must be >= 1")
        lr = self.discriminator_learning_rate
        check(lr is None or lr > 0, f"discriminator_learning_rate={lr}: must be > 0")
        norm = self.discriminator_max_grad_norm
        check(norm is None or norm >= 0, f"discriminator_max_grad_norm={norm}: must be >= 0 (0 disables clipping)")

    @property
    def heads(self) -> dict[str, list[int]]:
        """Discriminator kind -> its sizes (FFT sizes or periods)."""
        sizes = {"msstft": self.stft_discriminator_n_ffts, "mpd": self.mpd_periods}
        kinds = [k.strip() for k in self.discriminators.split(",") if k.strip()]
        return {kind: int_list(sizes[kind], kind) for kind in kinds}


@dataclass
class AdversarialConfig:
    """The game: adversarial loss, when the discriminator starts, and the generator's loss weights (DAC's)."""

    adversarial_loss_type: str = field(
        default="lsgan", metadata={"help": "lsgan (HiFi-GAN; the balanced one on the default run) or hinge (EnCodec)."}
    )
    discriminator_start_step: int = field(
        default=0, metadata={"help": "Train only on reconstruction until this step, then add the discriminator."}
    )
    mel_loss_weight: float = field(default=15.0, metadata={"help": "Weight of the multi-scale log-mel L1."})
    mel_loss_n_ffts: str = field(default="256,512,1024", metadata={"help": "STFT sizes of the mel loss."})
    waveform_loss_weight: float = field(default=0.1, metadata={"help": "Weight of the waveform L1."})
    adversarial_loss_weight: float = field(default=1.0, metadata={"help": "Weight of the generator's GAN loss."})
    feature_matching_loss_weight: float = field(default=2.0, metadata={"help": "Weight of feature matching."})
    commitment_loss_weight: float = field(default=1.0, metadata={"help": "Weight of the VQ commitment loss."})

    run_length: ClassVar[dict[str, str]] = {
        "discriminator_start_step": "discriminator_start_step={value} is after max_steps={steps}: the discriminator "
        "would never train; lower --discriminator_start_step or raise --max_steps (equal to max_steps: a "
        "reconstruction-only run)"
    }

    def __post_init__(self) -> None:
        check(
            self.adversarial_loss_type in ADVERSARIAL_LOSSES,
            f"adversarial_loss_type={self.adversarial_loss_type!r}: choose one of {sorted(ADVERSARIAL_LOSSES)}",
        )
        check(
            self.discriminator_start_step >= 0,
            f"discriminator_start_step={self.discriminator_start_step}: must be >= 0",
        )
        for name in (
            "mel_loss_weight", "waveform_loss_weight", "adversarial_loss_weight", "feature_matching_loss_weight",
            "commitment_loss_weight",
        ):  # fmt: skip
            value = getattr(self, name)
            check(value >= 0, f"{name}={value}: loss weights must be >= 0 (0 switches the term off)")
        int_list(self.mel_loss_n_ffts, "mel_loss_n_ffts")
