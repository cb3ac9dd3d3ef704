"""The align stage on the real recipe: DPO metrics, precomputed reference, accumulation, bad preference data."""

import pytest
from datasets import Dataset, DatasetDict

from hf_audio_trainer import align, pretrain
from hf_audio_trainer.codecs import MelKMeansTokenizer
from hf_audio_trainer.data.preferences import make_synthetic_preferences
from hf_audio_trainer.data.synthetic import make_synthetic_dataset
from hf_audio_trainer.trackers import read_metrics
from tests.helpers import fit_small_tokenizer, max_abs_diff, quick_run, weights

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    tokenizer = fit_small_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    out = tmp_path_factory.mktemp("pretrain")
    pretrain(quick_run(tokenizer, out, max_steps=8, overwrite_output_dir=True))
    return out


def settings(policy, out, **overrides):
    run = quick_run(None, out, model_name_or_path=str(policy), synthetic_num_pairs=40, **overrides)
    del run["tokenizer"], run["synthetic_num_clips"]  # the policy's tokenizer; pairs, not clips
    return run


def test_align_learns_the_preference_and_logs_trls_metrics(policy, tmp_path):
    result = align(
        settings(policy, tmp_path / "al", max_steps=12, eval_steps=12, eval_on_start=True, learning_rate=1e-3)
    )
    evals = [m for m in read_metrics(tmp_path / "al") if "eval/rewards/accuracies" in m]
    start, end = evals[0], evals[-1]
    assert start["eval/rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at step 0
    assert start["eval/loss"] == pytest.approx(0.6931, abs=1e-3)  # -log sigmoid(0)
    assert end["eval/rewards/margins"] > start["eval/rewards/margins"] and end["eval/loss"] < start["eval/loss"]
    train = [m for m in read_metrics(tmp_path / "al") if "train/rewards/accuracies" in m]
    assert all(0.0 <= m["train/rewards/accuracies"] <= 1.0 for m in train)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert f"train/{name}" in train[-1] and f"eval/{name}" in end
    m = train[-1]
    assert m["train/rewards/margins"] == pytest.approx(m["train/rewards/chosen"] - m["train/rewards/rejected"], 1e-5)
    assert (tmp_path / "al" / "model.safetensors").is_file() and result.global_step == 12


def test_precomputed_reference_trains_exactly_like_the_frozen_copy(policy, tmp_path):
    live = align(settings(policy, tmp_path / "live", max_steps=3))
    pre = align(settings(policy, tmp_path / "pre", max_steps=3, precompute_ref_log_probs=True))
    assert max_abs_diff(weights(tmp_path / "live"), weights(tmp_path / "pre")) < 1e-5
    assert pre.metrics["train/loss"] == pytest.approx(live.metrics["train/loss"], abs=1e-5)


def test_accumulation_2x2_equals_4x1_for_dpo(policy, tmp_path):
    small = align(
        settings(policy, tmp_path / "2x2", max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    )
    big = align(
        settings(policy, tmp_path / "4x1", max_steps=3, per_device_train_batch_size=4, gradient_accumulation_steps=1)
    )
    assert max_abs_diff(weights(tmp_path / "2x2"), weights(tmp_path / "4x1")) < 1e-5
    for name in ("train/loss", "train/rewards/accuracies", "train/rewards/margins"):
        assert small.metrics[name] == pytest.approx(big.metrics[name], abs=1e-5), name


def test_identical_pairs_are_skipped_and_a_missing_column_is_named(policy, tmp_path, capsys):
    pairs = make_synthetic_preferences(num_pairs=12, seed=0)
    train = pairs["train"].to_list()
    train[0]["rejected"] = train[0]["chosen"]
    train[1]["rejected"] = train[1]["chosen"]
    DatasetDict({"train": Dataset.from_list(train), "validation": pairs["validation"]}).save_to_disk(tmp_path / "ds")
    align(settings(policy, tmp_path / "al", max_steps=1, dataset_name=str(tmp_path / "ds")))
    assert "skipped 2 train pair(s) whose chosen and rejected are identical" in capsys.readouterr().out
    Dataset.from_dict({"prompt": [1, 2], "winner": [1, 2], "rejected": [3, 4]}).save_to_disk(tmp_path / "bad")
    with pytest.raises(ValueError, match=r"needs 'chosen' and 'rejected' columns; found \['prompt', 'winner'"):
        align(settings(policy, tmp_path / "al2", max_steps=1, dataset_name=str(tmp_path / "bad")))


def test_a_reference_with_another_tokenizer_is_refused(policy, tmp_path):
    waves = [a["array"] for a in make_synthetic_dataset(num_clips=16, seed=3)["train"]["audio"]]
    other_tokenizer = tmp_path / "tok"  # same shape (2 x 64) as the policy's, other codebooks
    MelKMeansTokenizer.fit(waves, 16000, num_codebooks=2, codebook_size=64, seed=3).save_pretrained(other_tokenizer)
    other = tmp_path / "other"
    pretrain(quick_run(other_tokenizer, other, max_steps=1))
    with pytest.raises(ValueError, match="tokenizer .* differs from the policy's"):
        align(settings(policy, tmp_path / "al", max_steps=1, ref_model_name_or_path=str(other)))


def test_on_policy_pairs_from_the_model_train_the_align_recipe(policy, tmp_path):
    from transformers import MusicgenForCausalLM

    from hf_audio_trainer.alignment import make_preference_pairs
    from hf_audio_trainer.codecs import load_audio_tokenizer

    model = MusicgenForCausalLM.from_pretrained(policy)
    tokenizer = load_audio_tokenizer(policy / "tokenizer")
    clips = make_synthetic_preferences(num_pairs=10, seed=1)["train"]
    prompts = [row["array"] for row in clips["prompt"]]
    pairs = make_preference_pairs(model, prompts, num_samples=3, tokenizer=tokenizer, seconds=0.5)
    assert len(pairs) >= 6  # a prompt drops out only when all its samples tie
    assert all(c >= r for c, r in zip(pairs["chosen_score"], pairs["rejected_score"], strict=True))
    assert all(len(codes) == 2 and len(codes[0]) == 25 for codes in pairs["chosen_codes"])  # 0.5 s at 50 frames/s
    pairs.save_to_disk(tmp_path / "pairs")  # pre-tokenized *_codes columns go straight into align
    result = align(settings(policy, tmp_path / "al", max_steps=2, dataset_name=str(tmp_path / "pairs")))
    assert result.global_step == 2 and 0.0 <= result.metrics["train/rewards/accuracies"] <= 1.0
