"""What a stage does to any model: load it with every weight accounted for, freeze parameters, add LoRA adapters
(peft) and merge them, tell what trains from what is frozen and load each back, count parameters."""

from __future__ import annotations

import copy
import fnmatch
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from hf_audio_trainer.errors import ConfigError, check


def load_pretrained(model_class, model_name_or_path: str, what: str, **kwargs) -> torch.nn.Module:
    """`model_class.from_pretrained`, refusing a checkpoint whose weights do not all fit the model.

    transformers only warns about MISSING weights (and initialises them anew) or UNEXPECTED ones (and drops them):
    a composite MusicGen folder loaded as a decoder would train from random weights without a word.
    """
    try:
        model, info = model_class.from_pretrained(model_name_or_path, output_loading_info=True, **kwargs)
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"could not load {what} from {model_name_or_path!r}: pass a folder written by save_pretrained "
            f"(config.json + model.safetensors) or a Hub id that is cached locally ({err})"
        ) from err
    problems = [
        f"{len(info[key])} {label} (e.g. {sorted(info[key])[:3]})"
        for key, label in (
            ("missing_keys", "MISSING"),
            ("unexpected_keys", "UNEXPECTED"),
            ("mismatched_keys", "MISMATCHED"),
        )
        if info.get(key)
    ]
    if problems:
        raise ConfigError(
            f"{model_name_or_path} does not fit {what}: {'; '.join(problems)} weight(s); pass a checkpoint of this "
            "model type (or the --model_family it was trained with)"
        )
    return model


@dataclass
class FinetuneOptions:
    """What a fine-tune changes about the pretrained model: frozen modules, or LoRA adapters through peft."""

    shapes_model: ClassVar[bool] = True  # LoRA adapters are weights of their own: a resume must match

    freeze_modules: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated parameter-name patterns to freeze (fnmatch, e.g. 'model.decoder.layers.0.*')."
        },
    )
    use_peft: bool = field(default=False, metadata={"help": "Train LoRA adapters (peft) instead of all weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (the update is scaled by alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA branch."})
    lora_target_modules: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated module names that get LoRA adapters; unset: the family's own list (its "
            "attention and feed-forward projections; the options reference lists each family's)."
        },
    )

    def __post_init__(self) -> None:
        check(self.lora_r >= 1, f"lora_r={self.lora_r}: must be >= 1")
        check(self.lora_alpha > 0, f"lora_alpha={self.lora_alpha}: must be > 0")
        check(0 <= self.lora_dropout < 1, f"lora_dropout={self.lora_dropout}: must be in [0, 1)")
        check(
            self.lora_target_modules is None or bool(self.lora_target_modules.strip()),
            "lora_target_modules must name at least one module",
        )


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

    targets = []
    for target in [t.strip() for t in lora_target_modules.split(",") if t.strip()]:
        # a list of layers (MusicGen's `lm_heads`, one per codebook) stands for its members
        lists = [
            m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] == target and isinstance(m, torch.nn.ModuleList)
        ]
        targets.extend([f"{target}.{i}" for i in range(len(lists[0]))] if lists else [target])
    names = [name for name, _ in model.named_modules()]
    present = {name.rsplit(".", 1)[-1] for name in names}
    missing = [t for t in targets if t not in present and not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ConfigError(f"--lora_target_modules {missing} are not modules of this model; e.g. {sorted(present)[:12]}")
    # a model whose other parts share the targets' names (ACE-Step's condition encoder) names what LoRA leaves alone
    exclude = getattr(model, "lora_exclude_modules", None)
    config = LoraConfig(
        r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=targets, exclude_modules=exclude
    )
    return get_peft_model(model, config)


def merged_model(peft_model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A plain transformers model with the LoRA adapters merged in, rebuilt on the CPU from the full state dict
    (`accelerator.get_state_dict`), so it works whatever wraps or shards the training model (FSDP2 forbids deepcopy;
    ZeRO-3 holds partitions). The training model is left as it is. A model that its config alone does not build
    (the flow families' DiT and conditioners) builds its empty twin with `new_like()`."""
    from peft import get_peft_model

    base = peft_model.get_base_model()
    twin = base.new_like() if hasattr(base, "new_like") else type(base)(base.config)
    fresh = get_peft_model(twin, copy.deepcopy(peft_model.peft_config["default"]))
    fresh.load_state_dict({name: value.to("cpu") for name, value in state_dict.items()})
    return fresh.merge_and_unload()


def trained_names(model: torch.nn.Module) -> set[str]:
    """The state-dict entries training changes: the trainable parameters, and the buffers of the modules that train
    (a codec's EMA codebooks, kept by a module without parameters inside a trained codec). A buffer belongs to the
    nearest module around it that has parameters; it is frozen when all of that module's parameters are (a frozen
    EnCodec's codebooks inside a MusicGen)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    has_params, trains = set(), set()
    for name, param in params.items():
        parts = name.split(".")[:-1]
        for depth in range(len(parts) + 1):
            prefix = ".".join(parts[:depth])
            has_params.add(prefix)
            if param.requires_grad:
                trains.add(prefix)
    names = {name for name, param in params.items() if param.requires_grad}
    for name in model.state_dict(keep_vars=True):
        if name in params:
            continue
        parts = name.split(".")[:-1]
        owners = (".".join(parts[:depth]) for depth in range(len(parts), -1, -1))
        owner = next((prefix for prefix in owners if prefix in has_params), None)
        if owner is None or owner in trains:  # a model without parameters, or a buffer of a module that trains
            names.add(name)
    return names


def split_state_dict(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(trained, frozen) entries of `model.state_dict()` (`trained_names`), each tensor under one name only: tied
    weights (T5's shared embedding) keep their first name, as safetensors needs. The tensors share the model's
    storage: copying into them loads the model."""
    trained = trained_names(model)
    seen, parts = set(), ({}, {})
    for name, tensor in model.state_dict().items():
        storage = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.shape)
        if tensor.numel() and storage in seen:
            continue
        seen.add(storage)
        parts[name not in trained][name] = tensor
    return parts


class WeightsDoNotFit(RuntimeError):
    """Saved weights are not exactly what a model trains (and holds frozen)."""


def load_entries(
    model: torch.nn.Module, trained: dict[str, torch.Tensor], frozen: dict[str, torch.Tensor], split: bool
) -> None:
    """Copy saved entries into `model`: `trained` must be exactly its trained entries and `frozen` the rest (`split`),
    or `trained` all of them, each of its shape; `WeightsDoNotFit` names what differs."""
    want_trained, want_frozen = split_state_dict(model)
    if split:
        checks = [("trained", trained, want_trained), ("frozen", frozen, want_frozen)]
    else:
        checks = [("saved", trained, {**want_trained, **want_frozen})]
    problems = []
    for what, got, want in checks:
        missing, unexpected = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
        other = sorted(n for n in want.keys() & got.keys() if got[n].shape != want[n].shape)
        for names, label in ((missing, "missing"), (unexpected, "unexpected"), (other, "of another shape")):
            if names:
                problems.append(f"{len(names)} {what} weight(s) {label} (e.g. {names[:3]})")
    if problems:
        raise WeightsDoNotFit("; ".join(problems))
    live = {**want_trained, **want_frozen}
    with torch.no_grad():
        for name, value in {**frozen, **trained}.items():
            live[name].copy_(value)


def num_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Parameter count of the whole model, also under DeepSpeed ZeRO-3 (whose parameters look empty locally)."""
    params = [p for p in model.parameters() if p.requires_grad or not trainable_only]
    return sum(getattr(p, "ds_numel", p.numel()) for p in params)
