"""The text-conditioned MusicGen family: a Hub-layout MusicgenForConditionalGeneration loads whole, fine-tunes (full
and LoRA) into folders that transformers' pipeline loads, the null condition is generate()'s unconditional branch,
and bad inputs are refused before training."""

import json

import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict
from safetensors.torch import load_file
from transformers import AutoProcessor, MusicgenForConditionalGeneration, pipeline

from hf_audio_trainer import align, finetune, pretrain
from hf_audio_trainer.alignment import tonal_clarity
from hf_audio_trainer.codecs import EncodecTokenizer
from hf_audio_trainer.config import ConfigError
from hf_audio_trainer.data.codes import CodesCollator
from hf_audio_trainer.data.text import TextCollator, conditioning, dropped, encode_texts
from hf_audio_trainer.families.musicgen_hub import load_composite, make_text_preference_pairs
from tests.helpers import described_folder, fit_small_tokenizer, tiny_clap, tiny_codec, tiny_musicgen

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def codec(tmp_path_factory):
    return tiny_codec(tmp_path_factory.mktemp("codec"))


@pytest.fixture(scope="module")
def hub_model(tmp_path_factory, codec):
    return tiny_musicgen(tmp_path_factory.mktemp("musicgen-tiny"), codec)


@pytest.fixture(scope="module")
def music(tmp_path_factory):
    return described_folder(tmp_path_factory.mktemp("music"))


def run_settings(output_dir, **overrides) -> dict:
    return {
        "model_family": "musicgen_text", "output_dir": str(output_dir), "report_to": "none", "logging_steps": 1,
        "eval_steps": 0, "eval_on_start": False, "save_steps": 1000, "max_steps": 2, "warmup_steps": 0,
        "per_device_train_batch_size": 4, "max_duration_seconds": 1.0, "dropout": 0.0, **overrides,
    }  # fmt: skip


def saved(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_a_hub_layout_musicgen_loads_every_weight(hub_model, tmp_path):
    model = load_composite(str(hub_model))
    state = model.state_dict()
    for name, value in saved(hub_model).items():
        assert torch.equal(state[name], value), name
    # a checkpoint with a weight missing is refused (transformers would initialise it anew and only warn)
    broken = tmp_path / "broken"
    model.save_pretrained(broken)
    weights = saved(broken)
    weights.pop("decoder.lm_heads.0.weight")
    from safetensors.torch import save_file

    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=r"does not fit a MusicgenForConditionalGeneration: 1 MISSING"):
        load_composite(str(broken))
    # the unconditional family, pointed at the composite, names the family to use instead of loading a decoder (the
    # checkpoint's own class decides: issue 25)
    with pytest.raises(ConfigError, match="is a MusicgenForConditionalGeneration, which the musicgen_text family "
                       "trains; drop --model_family .* --model_family musicgen_text"):  # fmt: skip
        finetune({**run_settings(tmp_path / "a"), "model_family": "musicgen", "model_name_or_path": str(hub_model)})


def test_checkpoints_this_family_cannot_train_are_refused_by_name(hub_model, tmp_path):
    from transformers import MusicgenConfig, MusicgenForCausalLM, MusicgenMelodyConfig

    from hf_audio_trainer.families.musicgen import build_decoder

    config = MusicgenConfig.from_pretrained(hub_model)
    config.decoder.audio_channels = 2
    config.save_pretrained(tmp_path / "stereo")
    with pytest.raises(ConfigError, match=r"is a stereo MusicGen \(audio_channels=2"):
        load_composite(str(tmp_path / "stereo"))
    melody = MusicgenMelodyConfig(
        text_encoder=config.text_encoder.to_dict(), audio_encoder=config.audio_encoder.to_dict(),
        decoder={**config.decoder.to_dict(), "model_type": "musicgen_melody_decoder"},
    )  # fmt: skip
    melody.save_pretrained(tmp_path / "melody")
    with pytest.raises(ConfigError, match="is MusicGen Melody .* not supported"):
        load_composite(str(tmp_path / "melody"))
    decoder = MusicgenForCausalLM(config.decoder)
    decoder.save_pretrained(tmp_path / "decoder")
    with pytest.raises(ConfigError, match="decoder-only MusicGen .* --model_family musicgen"):
        load_composite(str(tmp_path / "decoder"))
    # and the decoder-only family refuses a decoder with a weight missing, as every family does
    weights = load_file(str(tmp_path / "decoder" / "model.safetensors"))
    weights.pop("lm_heads.1.weight")
    from safetensors.torch import save_file

    save_file(weights, str(tmp_path / "decoder" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConfigError, match="does not fit a MusicgenForCausalLM: 1 MISSING"):
        build_decoder(str(tmp_path / "decoder"), "micro", 2, 64, 16)


def test_finetune_at_lr_0_exports_the_input_bit_for_bit_and_the_pipeline_generates(hub_model, music, tmp_path):
    out = tmp_path / "ft"
    result = finetune(run_settings(out, model_name_or_path=str(hub_model), dataset_name=str(music), learning_rate=0.0))
    assert result.global_step == 2
    before, after = saved(hub_model), saved(out)
    assert before.keys() == after.keys()
    assert max((before[k].double() - after[k].double()).abs().max().item() for k in before) == 0.0
    # transformers alone: the model, the processor and the text-to-audio pipeline, with guidance from the export
    generation = MusicgenForConditionalGeneration.from_pretrained(out).generation_config
    assert (generation.guidance_scale, generation.max_length) == (3.0, 256)  # the base model's own, kept
    assert type(AutoProcessor.from_pretrained(out)).__name__ == "MusicgenProcessor"
    audio = pipeline("text-to-audio", model=str(out))("a melody on a sine wave", forward_params={"max_new_tokens": 12})
    assert audio["sampling_rate"] == 16000 and audio["audio"].size > 0 and np.isfinite(audio["audio"]).all()


def test_lora_and_full_finetunes_train_the_decoder_and_export_loadable_folders(hub_model, music, tmp_path):
    before = saved(hub_model)
    for name, extra in {"full": {}, "lora": {"use_peft": True, "guidance_scale": 2.0}}.items():
        out = tmp_path / name
        result = finetune(
            run_settings(out, model_name_or_path=str(hub_model), dataset_name=str(music), learning_rate=1e-2, **extra)
        )
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert result.global_step == 2 and any("train/loss" in m for m in metrics)
        after = load_file(str(out / "model.safetensors"))
        assert after.keys() == before.keys()  # merged: a plain model, no adapter weights
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        # the codec and the (frozen) text encoder never change; LoRA reaches the text projection and the LM heads
        assert not any(k.startswith(("audio_encoder.", "text_encoder.")) for k in changed)
        assert "decoder.lm_heads.0.weight" in changed and "enc_to_dec_proj.weight" in changed
        assert "decoder.model.decoder.layers.0.self_attn.q_proj.weight" in changed
        MusicgenForConditionalGeneration.from_pretrained(out)
        if name == "lora":  # LayerNorms carry no adapter: LoRA leaves them as they were
            assert "decoder.model.decoder.layer_norm.weight" not in changed
        # --guidance_scale, when given, goes into the export's generation config (merged LoRA export included)
        generation = MusicgenForConditionalGeneration.from_pretrained(out).generation_config
        assert generation.guidance_scale == extra.get("guidance_scale", 3.0) and generation.max_length == 256


def test_train_text_encoder_trains_it_from_token_ids(hub_model, music, tmp_path):
    out = tmp_path / "with-text-encoder"
    finetune(
        run_settings(out, model_name_or_path=str(hub_model), dataset_name=str(music), learning_rate=1e-2,
                     train_text_encoder=True)
    )  # fmt: skip
    before, after = saved(hub_model), saved(out)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert "text_encoder.encoder.block.0.layer.0.SelfAttention.q.weight" in changed
    assert not any(k.startswith("audio_encoder.") for k in changed)


def test_the_null_condition_is_what_generate_uses_for_its_unconditional_branch(hub_model):
    model = load_composite(str(hub_model)).eval()
    processor = AutoProcessor.from_pretrained(hub_model)
    k, pad = model.config.decoder.num_codebooks, model.config.decoder.pad_token_id
    texts = ["a melody on a sine wave, clean", "an arpeggio with heavy noise"]
    ids = [processor.tokenizer(t)["input_ids"] for t in texts]
    states = encode_texts(model.text_encoder, ids, "cpu")
    rng = np.random.default_rng(0)
    rows = [{"codes": rng.integers(0, 64, (k, 7)).tolist(), "text_states": s.tolist()} for s in states]
    codes = CodesCollator(k, pad, pad, 50.0)
    null_batch = TextCollator(codes, cached=True, null=True)(rows)
    text_batch = TextCollator(codes, cached=True)(rows)
    assert null_batch["text_mask"].sum() == 0 and null_batch["encoder_states"].abs().sum() == 0
    assert text_batch["text_mask"].sum() == sum(len(x) for x in ids)

    def logits(inputs):
        with torch.no_grad():
            return model(**inputs, decoder_input_ids=text_batch["input_ids"]).logits

    # generate(guidance_scale > 1) appends zeros_like(text states) with a zero mask of the same width as the text
    width = text_batch["encoder_states"].shape[1]
    unconditional = {
        "encoder_outputs": (torch.zeros(2, width, model.config.text_encoder.hidden_size),),
        "attention_mask": torch.zeros(2, width, dtype=torch.long),
    }
    torch.testing.assert_close(logits(conditioning(null_batch)), logits(unconditional), rtol=0, atol=1e-6)
    # and the text changes the prediction (the condition is not ignored)
    assert (logits(conditioning(text_batch)) - logits(unconditional)).abs().max() > 1e-4


def test_condition_dropout_is_per_example_and_a_pure_function_of_the_data_position():
    draws = [dropped(0, epoch, row, 0.1) for epoch in range(4) for row in range(2500)]
    assert abs(np.mean(draws) - 0.1) < 0.015  # 10,000 draws: 3 standard deviations
    assert draws == [dropped(0, epoch, row, 0.1) for epoch in range(4) for row in range(2500)]  # resume sees the same
    assert draws[:2500] != draws[2500:5000]  # another epoch drops other examples
    assert not any(dropped(0, 0, row, 0.0) for row in range(1000))


def test_pretrain_from_scratch_on_the_embedded_data_trains_and_exports_a_hub_layout_model(codec, tmp_path):
    out = tmp_path / "scratch"
    clap = tiny_clap(tmp_path / "clap")
    result = pretrain(
        run_settings(
            out, tokenizer=str(codec), synthetic_num_clips=48, model_size="micro", max_steps=6, eval_steps=6,
            eval_on_start=True, learning_rate=1e-2, save_steps=6, clap_model=str(clap), fad_embedder="mel",
            num_eval_samples=4, eval_sample_seconds=0.5,
        )
    )  # fmt: skip
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in metrics if "eval/loss" in m]
    assert result.global_step == 6 and "eval/loss_uncond" in evals[-1]
    # guided samples from the validation prompts, scored by FAD and by CLAP against their own prompts
    assert all(-1 <= m["eval/clap_score"] <= 1 and m["eval/fad"] > 0 for m in evals)
    assert len(list((out / "samples" / "step-6").glob("*.wav"))) == 4
    # without FAD the CLAP score generates its own samples
    alone = pretrain(
        run_settings(
            tmp_path / "clap-only", tokenizer=str(codec), synthetic_num_clips=48, model_size="micro", max_steps=1,
            clap_model=str(clap), num_eval_samples=3, eval_sample_seconds=0.5, eval_steps=1,
        )
    )  # fmt: skip
    assert -1 <= alone.metrics["eval/clap_score"] <= 1 and "eval/fad" not in alone.metrics
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"]
    assert all(0 <= m["train/null_condition"] <= 1 for m in metrics if "train/loss" in m)  # the dropped share
    assert MusicgenForConditionalGeneration.from_pretrained(out).config.decoder.num_codebooks == 2
    best = MusicgenForConditionalGeneration.from_pretrained(out / "best")  # the best checkpoint loads the same way
    assert torch.equal(best.decoder.lm_heads[0].weight, saved(out)["decoder.lm_heads.0.weight"])


def test_bad_text_inputs_are_refused_before_training(codec, hub_model, music, tmp_path):
    base = run_settings(tmp_path / "x", model_name_or_path=str(hub_model), dataset_name=str(music))
    with pytest.raises(ConfigError, match=r"no text column 'caption' \(columns: \['audio', 'description'\]\)"):
        finetune({**base, "text_column": "caption"})
    with pytest.raises(ConfigError, match=r"condition_dropout=1.0: must be in \[0, 1\)"):
        finetune({**base, "condition_dropout": 1.0})
    with pytest.raises(ConfigError, match="guidance_scale=0.5: must be >= 1"):
        finetune({**base, "guidance_scale": 0.5})
    with pytest.raises(ConfigError, match="the musicgen family takes no text; use --model_family musicgen_text"):
        pretrain({"model_family": "musicgen", "condition_dropout": 0.2, "output_dir": str(tmp_path / "y")})
    with pytest.raises(ConfigError, match="--tokenizer with --model_name_or_path: .* drop --tokenizer"):
        finetune({**base, "tokenizer": str(codec)})
    with pytest.raises(ConfigError, match="needs a codec"):
        pretrain(run_settings(tmp_path / "z"))
    mel = fit_small_tokenizer(tmp_path / "mel")
    with pytest.raises(ConfigError, match="is a MelKMeansTokenizer; .* EnCodec"):
        pretrain(run_settings(tmp_path / "w", tokenizer=str(mel)))
    no_processor = tmp_path / "no-processor"
    MusicgenForConditionalGeneration.from_pretrained(hub_model).save_pretrained(no_processor)
    with pytest.raises(ConfigError, match="has no processor files"):
        finetune({**base, "model_name_or_path": str(no_processor)})
    mismatched = tiny_musicgen(tmp_path / "mismatched", codec, decoder_codebooks=3)
    with pytest.raises(ConfigError, match="the codec makes 2 codebooks of 64 but the decoder reads 3 of 64"):
        finetune({**base, "model_name_or_path": str(mismatched)})
    no_text = described_folder(tmp_path / "no-text", with_text=False)
    with pytest.raises(ConfigError, match="--instance_prompt"):
        finetune({**base, "dataset_name": str(no_text)})
    # with an instance prompt, the same folder trains
    assert finetune({**base, "dataset_name": str(no_text), "instance_prompt": "my band's sound"}).global_step == 2


def align_settings(output_dir, model, **overrides) -> dict:
    return {
        "model_family": "musicgen_text", "model_name_or_path": str(model), "output_dir": str(output_dir),
        "report_to": "none", "logging_steps": 5, "save_steps": 1000, "per_device_train_batch_size": 8,
        "max_duration_seconds": 3.0, "learning_rate": 1e-3, **overrides,
    }  # fmt: skip


def test_align_with_text_prompts_raises_held_out_reward_accuracy(hub_model, tmp_path):
    # the embedded pairs: a clip's description as the prompt, the clean clip chosen over a degraded copy
    out = tmp_path / "aligned"
    result = align(
        align_settings(out, hub_model, synthetic_num_pairs=64, max_steps=20, eval_steps=20, eval_on_start=True)
    )
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in evals if "eval/rewards/accuracies" in m]
    assert [m["step"] for m in evals] == [0, 20] and result.global_step == 20
    # at step 0 the policy is the reference: every reward is 0 and no held-out pair is ranked right
    assert evals[0]["eval/rewards/margins"] == 0 and evals[0]["eval/rewards/accuracies"] == 0
    assert evals[-1]["eval/rewards/accuracies"] > 0.5 and evals[-1]["eval/rewards/margins"] > 0
    assert MusicgenForConditionalGeneration.from_pretrained(out).config.decoder.num_codebooks == 2


def test_on_policy_pairs_rank_generations_and_align_on_them(hub_model, tmp_path):
    model = load_composite(str(hub_model)).eval()
    processor = AutoProcessor.from_pretrained(hub_model)
    prompts = ["a melody on a sine wave, clean", "an arpeggio, with heavy noise", "a chord on a square wave"] * 4
    torch.manual_seed(0)
    pairs = make_text_preference_pairs(model, processor, prompts, num_samples=3, seconds=0.5)
    assert 0 < len(pairs) <= len(prompts)
    assert all(c > r for c, r in zip(pairs["chosen_score"], pairs["rejected_score"], strict=True))
    assert np.asarray(pairs[0]["chosen_codes"]).shape == (2, 25)  # 2 codebooks x 0.5 s at 50 frames/s
    # the codes are what the model sampled: decoding them gives the scored audio back
    codec = EncodecTokenizer(model.audio_encoder)
    scores = [tonal_clarity(codec.decode(torch.tensor(c)).numpy(), 16000) for c in pairs["chosen_codes"]]
    np.testing.assert_allclose(scores, pairs["chosen_score"], rtol=1e-5)
    folder = tmp_path / "pairs"
    DatasetDict({"train": pairs, "validation": pairs.select(range(2))}).save_to_disk(str(folder))
    result = align(align_settings(tmp_path / "on-policy", hub_model, dataset_name=str(folder), max_steps=2))
    assert result.global_step == 2


def test_bad_align_inputs_are_refused(hub_model, tmp_path):
    folder = tmp_path / "no-prompt"
    rows = {"chosen_codes": [[[1, 2], [3, 4]]] * 4, "rejected_codes": [[[2, 1], [4, 3]]] * 4}
    DatasetDict({"train": Dataset.from_dict(rows), "validation": Dataset.from_dict(rows)}).save_to_disk(str(folder))
    with pytest.raises(ConfigError, match=r"needs 'prompt', 'chosen' and 'rejected' columns; found \['chosen_codes'"):
        align(align_settings(tmp_path / "a", hub_model, dataset_name=str(folder), max_steps=1))
    with pytest.raises(ConfigError, match="align keeps the text encoder frozen"):
        align(align_settings(tmp_path / "b", hub_model, max_steps=1, train_text_encoder=True))


def test_an_instance_prompt_is_every_clips_description():
    from hf_audio_trainer.config import TextConfig
    from hf_audio_trainer.data.text import text_of

    split = Dataset.from_dict({"description": ["a sine melody", None, "  padded  "]})
    text = TextConfig()
    assert text_of(text, split, "train") == ["a sine melody", "", "padded"]  # None and blanks: the null condition
    assert text_of(TextConfig(instance_prompt="my band"), split, "train") == ["my band"] * 3
