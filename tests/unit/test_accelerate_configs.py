"""The shipped accelerate configs load with accelerate's own reader and say what their names promise."""

import pytest
from accelerate.commands.config.config_args import load_config_from_file

from tests.helpers import ROOT

CONFIGS = ROOT / "accelerate_configs"


def load(name):
    return load_config_from_file(str(CONFIGS / name))


@pytest.mark.parametrize(
    ("name", "distributed_type", "processes", "machines"),
    [
        ("single_gpu.yaml", "NO", 1, 1),
        ("multi_gpu.yaml", "MULTI_GPU", 8, 1),
        ("fsdp2.yaml", "FSDP", 8, 1),
        ("deepspeed_zero2.yaml", "DEEPSPEED", 8, 1),
        ("deepspeed_zero3.yaml", "DEEPSPEED", 8, 1),
        ("multi_node.yaml", "MULTI_GPU", 16, 2),
        ("cpu_ddp.yaml", "MULTI_GPU", 2, 1),
    ],
)
def test_each_config_loads(name, distributed_type, processes, machines):
    config = load(name)
    assert str(config.distributed_type).endswith(distributed_type)
    assert (config.num_processes, config.num_machines) == (processes, machines)


def test_sharding_configs_shard_and_export_loadable_models():
    fsdp = load("fsdp2.yaml").fsdp_config
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_reshard_after_forward"] is True
    assert fsdp["fsdp_transformer_layer_cls_to_wrap"] == "MusicgenDecoderLayer"  # the decoder's layer class
    assert fsdp["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
    from transformers.models.musicgen import modeling_musicgen

    assert hasattr(modeling_musicgen, fsdp["fsdp_transformer_layer_cls_to_wrap"])
    assert load("deepspeed_zero2.yaml").deepspeed_config["zero_stage"] == 2
    zero3 = load("deepspeed_zero3.yaml").deepspeed_config
    assert zero3["zero_stage"] == 3 and zero3["zero3_save_16bit_model"] is True
    assert load("cpu_ddp.yaml").use_cpu is False  # use_cpu would start one process; ACCELERATE_USE_CPU=true instead


def test_tensor_parallel_on_a_model_without_a_tp_plan_is_refused_before_prepare():
    from types import SimpleNamespace

    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_audio_trainer.distributed import check_tensor_parallel
    from hf_audio_trainer.families.musicgen import build_decoder

    tp2 = SimpleNamespace(parallelism_config=SimpleNamespace(tp_size=2))
    musicgen = build_decoder(None, "micro", 2, 16, max_positions=32)
    with pytest.raises(
        ValueError, match="transformers has none for MusicgenForCausalLM: shard it with FSDP2 or ZeRO-3"
    ):
        check_tensor_parallel(tp2, musicgen)
    check_tensor_parallel(SimpleNamespace(parallelism_config=SimpleNamespace(tp_size=1)), musicgen)  # no TP: fine
    tiny = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=32)
    llama = LlamaForCausalLM(LlamaConfig(**tiny))
    check_tensor_parallel(tp2, llama)  # a model transformers can split passes
