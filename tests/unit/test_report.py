import json
import math
import struct
import subprocess
import sys

import pytest

from hf_audio_trainer import report
from hf_audio_trainer.report import draw, panels, write_report

T0 = 1_700_000_000.0
SECONDS_PER_STEP = 2.0
EVAL_LOSS = {10: 4.0, 20: 3.0, 30: 2.5, 40: 2.0, 50: 2.2}  # best at 40, last worse than best
EVAL_FAD = {10: 12.0, 20: 9.0, 30: 8.0, 40: 7.5, 50: 7.0}


def train_loss(step: int) -> float:
    return 6.0 * 0.97**step


def learning_rate(step: int, peak: float = 1e-3, warmup: int = 5, total: int = 50) -> float:
    if step < warmup:
        return peak * step / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def samples_per_second(step: int) -> float:
    return 10.0 + step % 3


def make_records() -> list[dict]:
    """50 train steps, evals every 10 steps (and before training), in the shape JSONLinesTracker writes."""
    records = [{"step": 0, "time": T0, "eval/loss": 4.5, "eval/fad": 15.0, "eval/rewards/accuracies": 0.5}]
    for step in range(1, 51):
        records.append(
            {
                "step": step,
                "time": T0 + SECONDS_PER_STEP * step,
                "train/loss": train_loss(step),
                "train/learning_rate": learning_rate(step),
                "train/samples_per_second": samples_per_second(step),
                "train/tokens_per_second": 1000 * samples_per_second(step),
                "train/audio_seconds_per_second": 5 * samples_per_second(step),
                "train/rewards/accuracies": step / 50,
                "train/rewards/margins": 0.1 * step,
            }
        )
        if step in EVAL_LOSS:
            records.append(
                {
                    "step": step,
                    "time": T0 + SECONDS_PER_STEP * step + 1.0,
                    "eval/loss": EVAL_LOSS[step],
                    "eval/loss_ema": EVAL_LOSS[step] + 0.1,
                    "eval/fad": EVAL_FAD[step],
                    "eval/fad_ema": EVAL_FAD[step] - 0.5,
                    "eval/rewards/accuracies": 0.5 + step / 100,
                }
            )
    return records


RUN_CONFIG = {
    "optim": "adamw",
    "learning_rate": 1e-3,
    "max_steps": 50,
    "per_device_train_batch_size": 16,
    "gradient_accumulation_steps": 2,
    "model_size": "tiny",
    "model_name_or_path": None,
    "mixed_precision": "bf16",
    "seed": 0,
}


def write_run(run_dir, records, config=RUN_CONFIG):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if config is not None:
        (run_dir / "run_config.json").write_text(json.dumps(config))
    return run_dir


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def expected_px(n_subplots: int) -> tuple[int, int]:
    height = report.FIG_MARGIN + report.SUBPLOT_HEIGHT * n_subplots
    return round(report.FIG_WIDTH * report.DPI), round(height * report.DPI)


@pytest.fixture
def run_dir(tmp_path):
    return write_run(tmp_path / "run", make_records())


def test_writes_one_png_per_present_panel_at_the_asked_size(run_dir):
    out = write_report(run_dir)

    assert out == (run_dir / "report").resolve()
    pngs = sorted(p.name for p in out.glob("*.png"))
    # no train/grad_norm in the file: no grad_norm.png; rewards/* goes to its own panel
    assert pngs == ["fad.png", "learning_rate.png", "loss.png", "other_rewards.png", "throughput.png"]
    assert png_size(out / "loss.png") == expected_px(1) == (800, 400)
    assert png_size(out / "learning_rate.png") == expected_px(1)
    assert png_size(out / "fad.png") == expected_px(1)
    assert png_size(out / "throughput.png") == expected_px(3)  # samples/s, tokens/s, audio s/s
    assert png_size(out / "other_rewards.png") == expected_px(2)  # rewards/accuracies, rewards/margins
    assert not list(run_dir.glob(".report.tmp-*"))


def test_summary_has_the_hand_computed_numbers(run_dir):
    text = (write_report(run_dir) / "summary.md").read_text()

    assert f"`{run_dir.resolve()}`" in text
    assert "logged steps: 51" in text  # steps 0..50
    assert "final step: 50" in text
    assert "wall-clock duration: 101.0 s (0:01:41)" in text  # step 0 at T0 .. the eval at step 50 at T0 + 101
    # eval/loss: first 4.5 at step 0, last 2.2 at step 50: (2.2 - 4.5) / 4.5 = -51.1%
    assert "| eval/loss | 4.5 (0) | 2.2 (50) | -51.1% |" in text
    assert "| eval/loss_ema | 4.1 (10) | 2.3 (50) | -43.9% |" in text  # (2.3 - 4.1) / 4.1
    first, last = train_loss(1), train_loss(50)
    change = 100 * (last - first) / first
    assert f"| train/loss | {first:.4g} (1) | {last:.4g} (50) | {change:+.1f}% |" in text
    assert "| eval/fad | 15 (0) | 7 (50) | -8 |" in text  # not a loss: absolute change
    assert "best eval/loss: 2 at step 40" in text
    assert "best eval/loss_ema: 2.1 at step 40" in text
    mean = sum(samples_per_second(s) for s in range(1, 51)) / 50
    assert f"samples / s: {mean:.4g}" in text
    assert f"tokens / s: {1000 * mean:.0f}" in text
    for setting in ("optim: adamw", "learning_rate: 0.001", "max_steps: 50", "per_device_train_batch_size: 16"):
        assert f"- {setting}" in text
    assert "- gradient_accumulation_steps: 2" in text
    assert "- model_size: tiny" in text and "- mixed_precision: bf16" in text
    assert "model_name_or_path" not in text and "seed" not in text  # unset, and not a key setting
    assert "![loss](loss.png)" in text and "![throughput](throughput.png)" in text
    assert "grad_norm" not in text


def test_loss_panel_holds_the_metrics_and_the_figure_draws_them():
    records = make_records()
    loss = panels(records)["loss"]

    (sub,) = loss.subplots
    assert [s.key for s in sub.series] == ["train/loss", "eval/loss", "eval/loss_ema"]
    train, evals, ema = sub.series
    assert train.steps == list(range(1, 51))
    assert train.values == [train_loss(s) for s in range(1, 51)]
    assert evals.steps == [0, *EVAL_LOSS] and evals.values == [4.5, *EVAL_LOSS.values()]
    assert ema.steps == list(EVAL_LOSS) and ema.values == pytest.approx([v + 0.1 for v in EVAL_LOSS.values()])
    assert not sub.log_y  # 6.0 -> 1.3 is not orders of magnitude

    fig = draw(loss, "run")
    (ax,) = fig.axes
    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == ["train/loss", "eval/loss", "eval/loss_ema"]
    assert list(lines[0].get_xdata()) == train.steps and list(lines[0].get_ydata()) == train.values
    assert list(lines[1].get_xdata()) == evals.steps and list(lines[1].get_ydata()) == evals.values
    assert ax.get_xlabel() == "step" and ax.get_yscale() == "linear"


def test_learning_rate_and_throughput_panels():
    out = panels(make_records())

    (lr,) = out["learning_rate"].subplots[0].series
    assert lr.values == [learning_rate(s) for s in range(1, 51)]
    assert max(lr.values) == pytest.approx(1e-3) and lr.values[-1] == pytest.approx(0.0)
    # one subplot per rate: their scales differ 1000x
    subs = out["throughput"].subplots
    assert [[s.key for s in sub.series] for sub in subs] == [
        ["train/samples_per_second"],
        ["train/tokens_per_second"],
        ["train/audio_seconds_per_second"],
    ]
    assert subs[1].series[0].values == [1000 * samples_per_second(s) for s in range(1, 51)]
    assert [s.key for s in out["fad"].subplots[0].series] == ["eval/fad", "eval/fad_ema"]


def test_other_metrics_are_grouped_by_the_name_after_the_prefix():
    records = [
        {"step": 1, "train/rewards/accuracies": 0.5, "train/rewards/margins": 1.0, "train/mean_difficulty": 0.3},
        {"step": 1, "eval/rewards/accuracies_ema": 0.7, "eval/rewards/accuracies": 0.6, "eval/odd key!": 2.0},
        {"step": 2, "train/skipped_steps": 0, "train/note": "text is not plotted", "other": 1.0},
        {"step": 2, "system/rss_gb": 1.5, "system/gpu_utilization": 80.0},
    ]
    out = panels(records)

    assert list(out) == ["system", "other_mean_difficulty", "other_odd_key_", "other_rewards", "other_skipped_steps"]
    assert [sub.ylabel for sub in out["system"].subplots] == ["gpu_utilization", "rss_gb"]
    rewards = out["other_rewards"].subplots
    assert [sub.ylabel for sub in rewards] == ["rewards/accuracies", "rewards/margins"]
    # train first, then eval, then its EMA: the same order (and colours) as the loss panel
    assert [s.key for s in rewards[0].series] == [
        "train/rewards/accuracies",
        "eval/rewards/accuracies",
        "eval/rewards/accuracies_ema",
    ]
    assert rewards[0].series[2].values == [0.7]
    assert out["other_skipped_steps"].subplots[0].series[0].values == [0.0]


def test_log_scale_only_when_the_loss_spans_orders_of_magnitude():
    records = [{"step": s, "train/loss": 8.0 * 0.9**s} for s in range(60)]  # 8 -> 0.016
    (sub,) = panels(records)["loss"].subplots
    assert sub.log_y
    assert draw(panels(records)["loss"]).axes[0].get_yscale() == "log"


def test_cli_writes_the_report(run_dir, tmp_path):
    out = tmp_path / "elsewhere" / "report"
    result = subprocess.run(
        [sys.executable, "-m", "hf_audio_trainer.report", str(run_dir), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 0, result.stderr
    assert str(out) in result.stdout
    assert (out / "summary.md").is_file()
    assert png_size(out / "loss.png") == expected_px(1)
    assert not (run_dir / "report").exists()


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_report(tmp_path / "nope")
    (tmp_path / "not_a_run").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no metrics.jsonl in .*not_a_run: is it a run's output_dir\?"):
        write_report(tmp_path / "not_a_run")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        write_report(empty)
    assert not list(tmp_path.rglob("report"))


def test_cli_errors_go_to_stderr_with_a_nonzero_exit(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        report.main([str(tmp_path / "nope")])
    assert exit_info.value.code != 0
    assert "does not exist" in capsys.readouterr().err


def test_without_run_config_the_settings_are_left_out(tmp_path):
    run = write_run(tmp_path / "run", make_records()[:3], config=None)
    text = (write_report(run) / "summary.md").read_text()
    assert "## Settings" not in text
    assert "final step: 2" in text


def test_a_failed_report_leaves_the_previous_one_whole(run_dir, monkeypatch):
    out = write_report(run_dir)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(report, "summary", broken)  # after the PNGs are drawn, before the swap
    with pytest.raises(RuntimeError, match="disk full"):
        write_report(run_dir)

    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in run_dir.iterdir()) == ["metrics.jsonl", "report", "run_config.json"]


def test_a_new_report_replaces_the_old_one_whole(run_dir):
    write_report(run_dir)
    records = [{k: v for k, v in r.items() if "rewards" not in k} for r in make_records()]
    write_run(run_dir, records)

    out = write_report(run_dir)

    assert not (out / "other_rewards.png").exists()  # stale panel gone
    assert (out / "loss.png").is_file()
    assert sorted(p.name for p in run_dir.iterdir()) == ["metrics.jsonl", "report", "run_config.json"]


def test_refuses_to_replace_a_folder_that_is_not_a_report(run_dir, tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(ValueError, match="holds more than a report"):
        write_report(run_dir, precious)
    assert (precious / "model.safetensors").read_bytes() == b"weights"
    with pytest.raises(ValueError, match="would replace the run folder"):
        write_report(run_dir, run_dir)
    assert (run_dir / "metrics.jsonl").is_file()


def test_a_torn_line_does_not_stop_the_report(tmp_path):
    run = write_run(tmp_path / "run", make_records())
    with open(run / "metrics.jsonl", "ab") as f:  # a crash in the middle of the last write
        f.write(b'{"step": 51, "train/lo' + b"\0" * 16)
    text = (write_report(run) / "summary.md").read_text()
    assert f"logged lines: {len(make_records())}," in text and "final step: 50" in text
