"""The codec being trained: an EnCodec model (transformers) with a trainable quantizer, its reconstruction losses and
metrics, and the fixed-length audio segments it trains on.

transformers' `EncodecModel` is an inference model: `forward` passes no gradient through the quantizer.
`CodecGenerator` trains the same modules as EnCodec does: a straight-through estimator hands the decoder's gradient to
the encoder, a commitment loss keeps the encoder near its codebook entries, and the codebooks (buffers) follow the
encoder by exponential moving averages. Nothing is added to the model, so `codec.save_pretrained` writes exactly the
layout `EncodecModel.from_pretrained` reads.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from transformers import EncodecConfig, EncodecModel

from hf_audio_trainer.adversarial import (
    AdversarialLoss,
    discriminator_accuracy,
    discriminator_loss,
    feature_matching_loss,
    frozen,
    generator_adversarial_loss,
)
from hf_audio_trainer.codecs import mel_filters
from hf_audio_trainer.data.audio import decode_audio
from hf_audio_trainer.errors import ConfigError
from hf_audio_trainer.models import load_pretrained
from hf_audio_trainer.trackers import log_audio

# New codecs by size: SEANet channels, latent size and depth. Hop 320 (8*5*4*2) gives 50 frames/s at 16 kHz, the
# frame rate of the default mel k-means tokenizer, so a pretrain run sees sequences of the same length.
CODEC_SIZES = {
    # micro: for tests and smoke runs
    "micro": dict(num_filters=2, hidden_size=16, num_lstm_layers=1, upsampling_ratios=[8, 5, 4, 2]),
    "tiny": dict(num_filters=4, hidden_size=32, num_lstm_layers=1, upsampling_ratios=[8, 5, 4, 2]),
    "small": dict(num_filters=16, hidden_size=64, num_lstm_layers=1, upsampling_ratios=[8, 5, 4, 2]),
    "base": dict(num_filters=32, hidden_size=128, num_lstm_layers=2, upsampling_ratios=[8, 5, 4, 2]),
}
DEFAULT_SAMPLE_RATE = 16000  # the synthetic dataset's rate
LOG_FLOOR = 1e-5  # added to mel power before the log: silence must not dominate the distance


def bandwidth_for(config: EncodecConfig, num_codebooks: int) -> float:
    """The target bandwidth (kbps) at which EnCodec uses exactly `num_codebooks` quantizers."""
    bandwidth = num_codebooks * config.frame_rate * math.log2(config.codebook_size) / 1000
    # EnCodec counts quantizers as floor(bandwidth * 1000 / bits per quantizer): keep float rounding from losing one
    return bandwidth + 1e-9 * max(bandwidth, 1.0)


def new_codec_config(size: str, sample_rate: int, num_codebooks: int, codebook_size: int) -> EncodecConfig:
    """A mono, unnormalised, unchunked EncodecConfig of `size` whose only bandwidth uses `num_codebooks` codebooks."""
    if size not in CODEC_SIZES:
        raise ConfigError(f"codec_size={size!r}: choose one of {sorted(CODEC_SIZES)}")
    if codebook_size < 2 or codebook_size & (codebook_size - 1):
        raise ConfigError(f"codebook_size={codebook_size}: EnCodec needs a power of 2 (e.g. 256)")
    arch = CODEC_SIZES[size]
    config = EncodecConfig(
        sampling_rate=sample_rate,
        audio_channels=1,
        codebook_size=codebook_size,
        codebook_dim=arch["hidden_size"],
        normalize=False,
        chunk_length_s=None,
        target_bandwidths=[1.0],  # replaced below, once the frame rate is known
        **arch,
    )
    config.target_bandwidths = [bandwidth_for(config, num_codebooks)]
    return config


def check_codec(model: EncodecModel) -> None:
    """The codec recipe trains what `EncodecTokenizer` can load: mono, unchunked, without loudness normalisation."""
    c = model.config
    if c.audio_channels != 1:
        raise ConfigError(f"the codec recipe trains mono codecs; this model has audio_channels={c.audio_channels}")
    if c.chunk_length_s is not None:
        raise ConfigError(f"chunked EnCodec models (chunk_length_s={c.chunk_length_s}) cannot be used as tokenizers")
    if c.normalize:
        raise ConfigError(
            "this EnCodec model normalises loudness per clip (normalize=True), a scale the codes do not carry; "
            "train a model with normalize=False"
        )


def build_codec(
    model_name_or_path: str | None, size: str, sample_rate: int | None, num_codebooks: int, codebook_size: int
) -> EncodecModel:
    """A new codec of `size`, or one loaded from a folder or Hub id (whose own sample rate must match if given)."""
    if model_name_or_path is None:
        model = EncodecModel(new_codec_config(size, sample_rate or DEFAULT_SAMPLE_RATE, num_codebooks, codebook_size))
    else:
        model = load_pretrained(EncodecModel, model_name_or_path, "an EncodecModel")
        if sample_rate is not None and sample_rate != model.config.sampling_rate:
            raise ConfigError(
                f"codec_sample_rate={sample_rate} but {model_name_or_path} runs at {model.config.sampling_rate} Hz; "
                "drop --codec_sample_rate (audio is resampled to the codec's rate) or pass the model's rate"
            )
    check_codec(model)
    return model


def num_codebooks_of(model: EncodecModel) -> int:
    """Quantizers used at the model's first (default) bandwidth, as `EncodecTokenizer` counts them."""
    q = model.quantizer
    return min(q.get_num_quantizers_for_bandwidth(model.config.target_bandwidths[0]), q.num_quantizers)


class CodecGenerator(torch.nn.Module):
    """Encoder -> residual VQ with straight-through gradients -> decoder, over an EncodecModel's own modules.

    `forward(audio [B, 1, T])` returns a dict: `audio` (the reconstruction, cropped to T), `codes`
    [num_codebooks, B, frames] (the codes `EncodecModel.encode` gives for the same input), and the per-clip
    `commitment` loss [B] (mean squared encoder-to-entry distance, summed over the quantizers).

    The codebooks learn as in EnCodec, by exponential moving averages of the frames assigned to each entry (kept in
    the codebook's own `cluster_size` / `embed_avg` buffers), not by gradient: an Adam step moves an entry by at
    most ~lr, far too slowly to follow the encoder (measured on the tiny codec, 120 steps: trained by a codebook loss
    the four codebooks used 1-2 entries each on a validation clip, by EMA 1, 7, 7 and 12). A training forward with
    gradients only records the assignments; `update_codebooks` applies them once per optimizer step, summed over
    micro-batches and processes, so the update is the same as one big batch's. Entries unused for a while (EMA count
    below `dead_code_threshold`) restart at the step's worst-quantized frames.
    """

    def __init__(self, codec: EncodecModel, decay: float = 0.99, dead_code_threshold: float = 0.1):
        super().__init__()
        check_codec(codec)
        self.codec, self.decay, self.dead_code_threshold = codec, decay, dead_code_threshold
        self.num_codebooks = num_codebooks_of(codec)
        # this step's assignment statistics: plain attributes, not buffers, because DDP would overwrite every
        # process's buffers with the main process's at each forward; empty at every checkpoint (taken between steps)
        self.step_counts: list[torch.Tensor] = []
        self.step_sums: list[torch.Tensor] = []
        self.step_frames: list[list[torch.Tensor]] = [[] for _ in range(self.num_codebooks)]

    @property
    def codebooks(self) -> list[torch.nn.Module]:
        """The `EncodecEuclideanCodebook`s in use (buffers `embed`, `embed_avg`, `cluster_size`)."""
        return [layer.codebook for layer in self.codec.quantizer.layers[: self.num_codebooks]]

    def forward(self, audio: torch.Tensor) -> dict[str, torch.Tensor]:
        latent = self.codec.encoder(audio)  # [B, D, frames]
        residual, quantized = latent, torch.zeros_like(latent)
        commitment = latent.new_zeros(latent.shape[0])
        collect = self.training and torch.is_grad_enabled()  # the generator's own step, not a D step or evaluation
        codes = []
        for k, book in enumerate(self.codebooks):
            flat = residual.detach().transpose(1, 2).reshape(-1, residual.shape[1]).float()
            index = nearest_entry(flat, book.embed)
            if collect:
                if len(self.step_counts) == k:
                    self.step_counts.append(torch.zeros_like(book.cluster_size))
                    self.step_sums.append(torch.zeros_like(book.embed_avg))
                self.step_counts[k] += torch.bincount(index, minlength=book.embed.shape[0])
                self.step_sums[k].index_add_(0, index, flat)
                self.step_frames[k].append(flat)
            chosen = book.embed[index].view(residual.shape[0], -1, residual.shape[1]).transpose(1, 2)
            commitment = commitment + (residual - chosen).pow(2).mean((1, 2))  # pulls the encoder to its entries
            quantized = quantized + chosen
            residual = residual - chosen
            codes.append(index.view(residual.shape[0], -1))
        # straight-through: the decoder sees the quantized latent, the encoder receives the decoder's gradient as if
        # quantization were the identity
        decoded = self.codec.decoder(latent + (quantized.to(latent.dtype) - latent).detach())
        return {"audio": decoded[..., : audio.shape[-1]], "codes": torch.stack(codes), "commitment": commitment}

    @torch.no_grad()
    def update_codebooks(self, accelerator, applied: bool = True) -> None:
        """Fold this optimizer step's assignments into the codebooks (all processes'), then clear them.

        `applied=False` (a skipped step) only clears them. Laplace smoothing of the counts as in EnCodec.
        """
        if applied and self.step_counts:
            world = accelerator.num_processes
            counts, sums = torch.stack(self.step_counts), torch.stack(self.step_sums)
            if world > 1:
                counts, sums = accelerator.reduce(counts, "sum"), accelerator.reduce(sums, "sum")
            for k, book in enumerate(self.codebooks):
                book.cluster_size.mul_(self.decay).add_(counts[k], alpha=1 - self.decay)
                book.embed_avg.mul_(self.decay).add_(sums[k], alpha=1 - self.decay)
                n, entries = book.cluster_size.sum(), book.embed.shape[0]
                smoothed = (book.cluster_size + 1e-5) / (n + entries * 1e-5) * n
                book.embed.copy_(book.embed_avg / smoothed[:, None])
                dead = (book.cluster_size < self.dead_code_threshold).nonzero().flatten()
                if len(dead):
                    # every process's frames, in the order one big batch would have them
                    frames = torch.cat(self.step_frames[k])
                    frames = accelerator.gather(frames) if world > 1 else frames
                    error = (frames - book.embed[nearest_entry(frames, book.embed)]).pow(2).sum(1)
                    worst = frames[error.topk(min(len(dead), len(frames))).indices]
                    dead = dead[: len(worst)]
                    book.embed[dead] = worst
                    book.embed_avg[dead] = worst * self.dead_code_threshold
                    book.cluster_size[dead] = self.dead_code_threshold
        self.step_counts, self.step_sums = [], []
        self.step_frames = [[] for _ in range(self.num_codebooks)]


def nearest_entry(frames: torch.Tensor, embed: torch.Tensor) -> torch.Tensor:
    """Index of the closest codebook entry for each frame [N, D]: `EncodecEuclideanCodebook.quantize`'s formula
    (same arithmetic, so the same ties), so the trained codes are the ones the exported model's `encode` gives."""
    embed_t = embed.t()
    dist = -(frames.pow(2).sum(1, keepdim=True) - 2 * frames @ embed_t + embed_t.pow(2).sum(0, keepdim=True))
    return dist.max(dim=-1).indices


@torch.no_grad()
def init_codebooks(generator: CodecGenerator, audio: torch.Tensor, seed: int = 0) -> None:
    """Data-dependent start: each codebook takes random encoder frames of its residual (EnCodec's k-means init idea).

    EnCodec's codebooks start at zero, where every frame picks entry 0 and the others never move. `audio` should be
    the same on every process (the first training clips), so all ranks start from the same codebooks. Each entry
    starts as the average of one frame, so its first updates move it as much as real assignments do.
    """
    generator_rng = torch.Generator().manual_seed(seed)
    residual = generator.codec.encoder(audio)
    frames = residual.transpose(1, 2).reshape(-1, residual.shape[1]).float()
    for book in generator.codebooks:
        picks = torch.randint(len(frames), (book.embed.shape[0],), generator=generator_rng)
        book.embed.copy_(frames[picks])
        book.embed_avg.copy_(frames[picks])
        book.cluster_size.fill_(1.0)
        frames = frames - book.embed[nearest_entry(frames, book.embed)]


# --------------------------------------------------------------------------------------------------------------------
# Reconstruction losses and metrics (per clip, so sums over clips normalise exactly under accumulation)
# --------------------------------------------------------------------------------------------------------------------


class MultiScaleMelDistance(torch.nn.Module):
    """Per-clip mean |log-mel(x) - log-mel(y)| over frames and bands, averaged over STFT sizes (EnCodec's l_f scales).

    The training loss and the `mel_distance` metric are the same function. Each scale uses a Hann window of n_fft,
    hop n_fft / 4 and min(64, n_fft / 8) mel bands (more bands than that would leave empty low filters).
    """

    def __init__(self, sample_rate: int, n_ffts: Sequence[int] = (256, 512, 1024)):
        super().__init__()
        self.n_ffts = list(n_ffts)
        for n_fft in self.n_ffts:
            self.register_buffer(f"window_{n_fft}", torch.hann_window(n_fft), persistent=False)
            fb = mel_filters(sample_rate, n_fft, min(64, n_fft // 8))
            self.register_buffer(f"mel_{n_fft}", fb, persistent=False)

    def log_mel(self, audio: torch.Tensor, n_fft: int) -> torch.Tensor:
        spec = torch.stft(
            audio.float().flatten(0, -2), n_fft, n_fft // 4, window=getattr(self, f"window_{n_fft}"), center=True,
            pad_mode="constant", return_complex=True,
        )  # fmt: skip
        power = torch.view_as_real(spec).square().sum(-1)  # [B, freq, frames]
        return (power.transpose(1, 2) @ getattr(self, f"mel_{n_fft}")).add(LOG_FLOOR).log()

    def forward(self, estimate: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """[B] distances between estimate and reference [B, 1, T] (or [B, T])."""
        distances = [(self.log_mel(estimate, n) - self.log_mel(reference, n)).abs().mean((1, 2)) for n in self.n_ffts]
        return torch.stack(distances).mean(0)


def waveform_l1(estimate: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-clip mean absolute sample difference [B] (EnCodec's time-domain term)."""
    return (estimate.float() - reference.float()).abs().flatten(1).mean(1)


def si_sdr(estimate: torch.Tensor, reference: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Scale-invariant signal-to-distortion ratio in dB per clip [B] (Le Roux et al. 2019; zero-mean signals)."""
    s = reference.float().flatten(1)
    s_hat = estimate.float().flatten(1)
    s = s - s.mean(1, keepdim=True)
    s_hat = s_hat - s_hat.mean(1, keepdim=True)
    alpha = (s_hat * s).sum(1, keepdim=True) / (s.pow(2).sum(1, keepdim=True) + eps)
    target = alpha * s
    noise = s_hat - target
    return 10 * torch.log10((target.pow(2).sum(1) + eps) / (noise.pow(2).sum(1) + eps))


# --------------------------------------------------------------------------------------------------------------------
# Training data: fixed-length segments, resumable without replay
# --------------------------------------------------------------------------------------------------------------------


def segment_samples(segment_seconds: float, sample_rate: int, hop_length: int) -> int:
    """Samples per training segment, rounded down to whole codec frames (at least one)."""
    return max(1, int(segment_seconds * sample_rate) // hop_length) * hop_length


def crop(wave: np.ndarray, length: int, rng: np.random.Generator) -> np.ndarray:
    """A random `length`-sample window of the clip; a shorter clip is zero-padded at the end."""
    if len(wave) <= length:
        return np.pad(wave, (0, length - len(wave)))
    start = int(rng.integers(0, len(wave) - length + 1))
    return wave[start : start + length]


def segment_stream(
    dataset: Dataset,
    sampler,
    micro_batch_size: int,
    length: int,
    sample_rate: int,
    audio_column: str = "audio",
    seed: int = 0,
    start_step: int = 0,
) -> Iterator[dict]:
    """Endless micro-batches {"audio" [B, 1, length], "num_items": B, ...} for this rank, from step `start_step`.

    The clip order is the sampler's (a function of seed, epoch and position) and each crop is drawn from
    (seed, epoch, clip index), so a resumed run reads exactly the segments the uninterrupted one would have.
    """
    sampler.load_state_dict(sampler.state_at_step(start_step))
    rows = dataset.select_columns([audio_column])
    while True:
        indices: list[int] = []
        for index in sampler:
            indices.append(index)
            if len(indices) == micro_batch_size:
                values = rows[indices][audio_column]
                waves = [
                    crop(
                        decode_audio(v, sample_rate, where=f"train row {i}"),
                        length,
                        np.random.default_rng([seed, sampler.epoch, i]),
                    )
                    for v, i in zip(values, indices, strict=True)
                ]
                yield {
                    "audio": torch.from_numpy(np.stack(waves))[:, None],
                    "num_items": len(waves),
                    "num_samples": len(waves),
                    "audio_seconds": len(waves) * length / sample_rate,
                }
                indices = []
        sampler.set_epoch(sampler.epoch + 1)


# --------------------------------------------------------------------------------------------------------------------
# The objective: what each network's step minimises
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class LossWeights:
    """Weights of the generator's terms: DAC's (Kumar et al. 2023) mel, adversarial and feature weights, EnCodec's
    time-domain and commitment ones. Reconstruction dominates: with EnCodec's 1 / 3 / 3 (mel / adversarial /
    features, without its loss balancer) the tiny codec's mel distance rose once the discriminator started."""

    mel: float = 15.0
    waveform: float = 0.1
    adversarial: float = 1.0
    feature_matching: float = 2.0
    commitment: float = 1.0


def _split_heads(outputs: list) -> tuple[list, list, list, list]:
    """Outputs of one forward on cat([real, fake]) -> real logits, fake logits, real features, fake features."""
    real_logits, fake_logits, real_feats, fake_feats = [], [], [], []
    for logits, features in outputs:
        r, f = logits.chunk(2)
        real_logits.append(r)
        fake_logits.append(f)
        real_feats.append([x.chunk(2)[0] for x in features])
        fake_feats.append([x.chunk(2)[1] for x in features])
    return real_logits, fake_logits, real_feats, fake_feats


class CodecObjective:
    """`discriminator_loss(batch)` and `generator_loss(batch, adversarial)`: per-clip sums and per-clip stat sums.

    Real and generated audio go through the discriminator in one forward (one DDP reduction per backward). The
    discriminator step reconstructs without a graph through the unwrapped generator; the generator step runs the
    unwrapped, frozen discriminator, so no gradient (and no DDP hook) reaches the discriminator's parameters.
    """

    def __init__(
        self,
        accelerator,
        generator: torch.nn.Module,
        discriminator: torch.nn.Module,
        mel: MultiScaleMelDistance,
        loss: AdversarialLoss,
        weights: LossWeights,
    ):
        self.accelerator, self.generator, self.discriminator = accelerator, generator, discriminator
        self.mel, self.loss, self.weights = mel, loss, weights

    def discriminator_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        real = batch["audio"]
        with torch.no_grad():
            fake = self.accelerator.unwrap_model(self.generator)(real)["audio"].float()
        real_logits, fake_logits, _, _ = _split_heads(self.discriminator(torch.cat([real, fake])))
        losses = discriminator_loss(real_logits, fake_logits, self.loss)
        on_real, on_fake = discriminator_accuracy(real_logits, fake_logits, self.loss.threshold)
        return losses.sum(), {"d_acc_real": on_real.sum(), "d_acc_fake": on_fake.sum()}

    def __call__(self, generator: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The reconstruction loss of `generator` alone: the `loss_fn(model, batch)` every family offers."""
        return self.generator_loss(batch, adversarial=False, generator=generator)

    def generator_loss(
        self, batch: dict, adversarial: bool, generator: torch.nn.Module | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        real, w = batch["audio"], self.weights
        out = (generator or self.generator)(real)
        fake = out["audio"].float()
        terms = {
            "mel_distance": self.mel(fake, real),
            "waveform_l1": waveform_l1(fake, real),
            "commitment_loss": out["commitment"],
        }
        total = (
            w.mel * terms["mel_distance"] + w.waveform * terms["waveform_l1"] + w.commitment * terms["commitment_loss"]
        )
        if adversarial:
            discriminator = self.accelerator.unwrap_model(self.discriminator)
            with frozen(discriminator):
                _, fake_logits, real_feats, fake_feats = _split_heads(discriminator(torch.cat([real, fake])))
            terms["g_adv_loss"] = generator_adversarial_loss(fake_logits, self.loss)
            terms["feature_matching_loss"] = feature_matching_loss(real_feats, fake_feats)
            total = total + w.adversarial * terms["g_adv_loss"] + w.feature_matching * terms["feature_matching_loss"]
        return total.sum(), {name: value.detach().sum() for name, value in terms.items()}


# --------------------------------------------------------------------------------------------------------------------
# Evaluation: reconstruction error, FAD of reconstructions, and a few clips to listen to
# --------------------------------------------------------------------------------------------------------------------


class ReconstructionEvaluator:
    """`evaluator(generator, step, suffix)` -> eval/mel_distance, eval/si_sdr, eval/waveform_l1 and eval/fad (with
    `suffix`, e.g. "_ema"), over whole validation clips; writes the first clips to OUTPUT_DIR/samples/step-N/.

    Each process reconstructs every world-th clip; sums are reduced and embeddings gathered. FAD compares the
    reconstructions with the original clips (reference statistics computed once), in the `embedder`'s space.
    """

    def __init__(
        self,
        accelerator,
        waves: list[np.ndarray],
        sample_rate: int,
        mel: MultiScaleMelDistance,
        output_dir,
        embedder: str | None = "mel",
        embedder_model: str | None = None,
        num_saved: int = 4,
    ):
        from hf_audio_trainer.metrics.embedders import load_embedder
        from hf_audio_trainer.metrics.fad import embedding_statistics

        self.accelerator, self.sample_rate, self.mel = accelerator, sample_rate, mel
        self.mine = waves[accelerator.process_index :: accelerator.num_processes]
        self.originals = self.mine[:num_saved]  # the main process saves its own first clips
        self.output_dir, self.num_saved = Path(output_dir), num_saved
        self.embedder = self.reference = None
        if embedder is not None:
            with torch.random.fork_rng():  # a network embedder's initial weights must not come from training's RNG
                self.embedder = load_embedder(embedder, embedder_model, device=str(accelerator.device))
            self.reference = embedding_statistics(self.embedder.embed(waves, sample_rate))

    @torch.no_grad()
    def __call__(self, generator: torch.nn.Module, step: int, suffix: str = "") -> dict[str, float]:
        from accelerate.utils import gather_object

        from hf_audio_trainer.metrics.fad import embedding_statistics, frechet_distance

        acc, device = self.accelerator, self.accelerator.device
        was_training = generator.training
        generator.eval()
        sums = torch.zeros(4, dtype=torch.float64, device=device)  # mel distance, SI-SDR, waveform L1, clips
        reconstructions = []
        for wave in self.mine:
            real = torch.from_numpy(wave)[None, None].to(device)
            fake = generator(real)["audio"].float()
            sums += torch.stack(
                [
                    self.mel(fake, real)[0],
                    si_sdr(fake, real)[0],
                    waveform_l1(fake, real)[0],
                    torch.ones((), device=device),
                ]
            ).double()
            reconstructions.append(fake[0, 0].cpu().numpy())
        generator.train(was_training)
        mel, sdr, l1, clips = acc.reduce(sums).tolist()
        results = {
            f"eval/mel_distance{suffix}": mel / clips,
            f"eval/si_sdr{suffix}": sdr / clips,
            f"eval/waveform_l1{suffix}": l1 / clips,
        }
        if self.embedder is not None:
            local = list(self.embedder.embed(reconstructions, self.sample_rate)) if reconstructions else []
            embeddings = np.stack(gather_object(local))
            results[f"eval/fad{suffix}"] = frechet_distance(*embedding_statistics(embeddings), *self.reference)
        if acc.is_main_process:
            self.save(reconstructions[: self.num_saved], step, suffix)
        return results

    def save(self, waves: list[np.ndarray], step: int, suffix: str) -> None:
        import soundfile as sf

        folder = self.output_dir / "samples" / f"step-{step}"
        folder.mkdir(parents=True, exist_ok=True)
        for i, (wave, original) in enumerate(zip(waves, self.originals, strict=False)):
            sf.write(folder / f"reconstruction{suffix}-{i}.wav", np.clip(wave, -1, 1), self.sample_rate)
            sf.write(folder / f"original-{i}.wav", np.clip(original, -1, 1), self.sample_rate)
        log_audio(self.accelerator, f"reconstructions{suffix}", waves, step, self.sample_rate)
