"""Model builders (a MusicGen-style multi-codebook decoder) and the audio language-model loss."""

from __future__ import annotations

import copy
import fnmatch

import torch
import torch.nn.functional as F
from transformers import MusicgenDecoderConfig, MusicgenForCausalLM

from hf_audio_trainer.errors import ConfigError

# Sizes of a new model. "tiny" trains in a few minutes on two CPU cores.
MODEL_SIZES = {
    "micro": dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, ffn_dim=64),  # tests, benchmarks
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, ffn_dim=512),
    "small": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, ffn_dim=2048),
    "medium": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, ffn_dim=4096),
}


def new_model_config(
    size: str, num_codebooks: int, codebook_size: int, max_positions: int, dropout: float | None = None
) -> MusicgenDecoderConfig:
    """A decoder config for a tokenizer's codebooks; the pad/BOS id is one past the last code."""
    if size not in MODEL_SIZES:
        raise ConfigError(f"unknown model size {size!r}; choose one of {sorted(MODEL_SIZES)}")
    config = MusicgenDecoderConfig(
        vocab_size=codebook_size,
        num_codebooks=num_codebooks,
        max_position_embeddings=max_positions,
        pad_token_id=codebook_size,
        bos_token_id=codebook_size,
        audio_channels=1,
        **MODEL_SIZES[size],
    )
    set_dropout(config, dropout)
    return config


def set_dropout(config: MusicgenDecoderConfig, dropout: float | None) -> None:
    """Override every dropout probability of the config (None keeps the model's own)."""
    if dropout is not None:
        config.dropout = config.attention_dropout = config.activation_dropout = dropout


def build_model(
    model_name_or_path: str | None,
    size: str,
    num_codebooks: int,
    codebook_size: int,
    max_positions: int,
    dropout: float | None = None,
) -> MusicgenForCausalLM:
    """Load a MusicgenForCausalLM from a folder or Hub id, or make a new one sized for the tokenizer."""
    if model_name_or_path is None:
        model = MusicgenForCausalLM(new_model_config(size, num_codebooks, codebook_size, max_positions, dropout))
        # transformers initialises the code embeddings with std 0.02, which the unit-scale sinusoidal positions
        # drown out: a small model then needs hundreds of steps to grow them (measured on the default run: val loss
        # 5.29 vs 3.53 after 150 steps). N(0, 1) is torch's and audiocraft's own init for these embeddings.
        for embedding in model.get_input_embeddings():
            torch.nn.init.normal_(embedding.weight, std=1.0)
        return freeze_cross_attention(model)
    overrides = {}
    if dropout is not None:
        overrides = dict(dropout=dropout, attention_dropout=dropout, activation_dropout=dropout)
    try:
        model = MusicgenForCausalLM.from_pretrained(model_name_or_path, **overrides)
    except OSError as err:
        raise ConfigError(
            f"could not load a MusicgenForCausalLM from {model_name_or_path!r}: pass a folder written by "
            f"save_pretrained (config.json + model.safetensors) or a Hub id that is cached locally ({err})"
        ) from err
    check_model_fits_tokenizer(model.config, num_codebooks, codebook_size, max_positions)
    return freeze_cross_attention(model)


def freeze_cross_attention(model: MusicgenForCausalLM) -> MusicgenForCausalLM:
    """Unconditional training passes no encoder states, so cross-attention gets no gradient: freeze it.

    Otherwise DDP waits for gradients that never come (it needs every trainable parameter to get one), and the
    optimizer would keep states for weights it never updates. The weights stay in the model and its checkpoints.
    """
    for name, param in model.named_parameters():
        if ".encoder_attn" in name:
            param.requires_grad_(False)
    return model


def adapt_for_finetuning(
    model: torch.nn.Module,
    freeze_modules: str | None = None,
    use_peft: bool = False,
    lora_r: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.05,
    lora_target_modules: str = "q_proj,k_proj,v_proj,out_proj,fc1,fc2",
) -> torch.nn.Module:
    """Freeze parameters by name pattern (fnmatch), and/or wrap the model with LoRA adapters through peft."""
    names = [n for n, _ in model.named_parameters()]
    for pattern in [p.strip() for p in (freeze_modules or "").split(",") if p.strip()]:
        matched = [n for n in names if fnmatch.fnmatch(n, pattern) or n.startswith(pattern + ".")]
        if not matched:
            raise ConfigError(
                f"--freeze_modules {pattern!r} matches no parameter; names look like {names[:3]} ... (fnmatch "
                "patterns such as 'model.decoder.layers.0.*', or a module prefix such as 'model.decoder.embed_tokens')"
            )
        for name, param in model.named_parameters():
            if name in matched:
                param.requires_grad_(False)
    if not use_peft:
        return model
    from peft import LoraConfig, get_peft_model

    targets = [t.strip() for t in lora_target_modules.split(",") if t.strip()]
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in present]
    if missing:
        raise ConfigError(f"--lora_target_modules {missing} are not modules of this model; e.g. {sorted(present)[:12]}")
    config = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=targets)
    return get_peft_model(model, config)


def merged_model(peft_model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A plain transformers model with the LoRA adapters merged in, rebuilt on the CPU from the full state dict
    (`accelerator.get_state_dict`), so it works whatever wraps or shards the training model (FSDP2 forbids deepcopy;
    ZeRO-3 holds partitions). The training model is left as it is."""
    from peft import get_peft_model

    base = peft_model.get_base_model()
    fresh = get_peft_model(type(base)(base.config), copy.deepcopy(peft_model.peft_config["default"]))
    fresh.load_state_dict({name: value.to("cpu") for name, value in state_dict.items()})
    return fresh.merge_and_unload()


def check_model_fits_tokenizer(
    config: MusicgenDecoderConfig, num_codebooks: int, codebook_size: int, max_positions: int
) -> None:
    """Fail early when a loaded model cannot read the tokenizer's codes."""
    if config.num_codebooks != num_codebooks:
        raise ConfigError(
            f"the model predicts {config.num_codebooks} codebooks but the tokenizer makes {num_codebooks}; "
            "use the tokenizer the model was trained with (--tokenizer)"
        )
    if config.vocab_size < codebook_size:
        raise ConfigError(
            f"the model's vocab_size {config.vocab_size} is smaller than the tokenizer's codebook_size "
            f"{codebook_size}; use the tokenizer the model was trained with (--tokenizer)"
        )
    if config.max_position_embeddings < max_positions:
        raise ConfigError(
            f"the model handles {config.max_position_embeddings} positions but clips need {max_positions}; "
            "lower --max_duration_seconds"
        )


def lm_loss(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], label_smoothing: float = 0.0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sum (not mean) of the per-token cross-entropies over all codebooks; the loop divides by the token count."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # float32 for the softmax even under autocast, so bf16/fp16 runs report comparable losses
    loss = F.cross_entropy(
        logits.float().flatten(0, 1),
        batch["labels"].flatten(),
        ignore_index=-100,
        reduction="sum",
        label_smoothing=label_smoothing,
    )
    return loss, {}


def num_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Parameter count of the whole model, also under DeepSpeed ZeRO-3 (whose parameters look empty locally)."""
    params = [p for p in model.parameters() if p.requires_grad or not trainable_only]
    return sum(getattr(p, "ds_numel", p.numel()) for p in params)
