"""The speed-up table: its arithmetic, its equivalence check, and the command that writes it."""

import json

import pytest
import torch

import kvlab.bench.cache_speedup
from kvlab.bench import GenerationTiming
from kvlab.bench.cli import main
from kvlab.bench import speedup_markdown, speedup_table
from conftest import make_model


def fake_timer(cached_per_token=0.01, uncached_per_token_squared=0.001, corrupt=False):
    """A stand-in for time_generation with known totals: cached N·a seconds, uncached N²·b seconds."""
    def time_generation(model, idx, n, *, use_cache=True, cache_kind="static"):
        total = n * cached_per_token if use_cache else n * n * uncached_per_token_squared
        tokens = torch.zeros(idx.size(0), idx.size(1) + n, dtype=torch.long)
        if corrupt and use_cache:
            tokens[0, -1] = 1
        return GenerationTiming("kvlab", use_cache, idx.size(0), idx.size(1), n, 0.0, [], total), tokens
    return time_generation


def test_rows_and_summary_are_computed_from_the_timings(monkeypatch):
    monkeypatch.setattr(kvlab.bench.cache_speedup, "time_generation", fake_timer())
    table = speedup_table(make_model("gpt2"), [10, 20, 40], prompt_len=4, progress=None)
    rows = {r["new_tokens"]: r for r in table["rows"]}
    # uncached 0.1, 0.4, 1.6 s; cached 0.1, 0.2, 0.4 s
    assert rows[10]["speedup"] == pytest.approx(1.0) and rows[10]["time_saved_pct"] == pytest.approx(0.0)
    assert rows[20]["speedup"] == pytest.approx(2.0) and rows[20]["time_saved_pct"] == pytest.approx(50.0)
    assert rows[40]["speedup"] == pytest.approx(4.0) and rows[40]["time_saved_pct"] == pytest.approx(75.0)
    s = table["summary"]
    assert s["average_speedup"] == pytest.approx(7 / 3)
    assert s["best_speedup"] == pytest.approx(4.0) and s["best_at_new_tokens"] == 40
    assert s["time_saved_s"] == pytest.approx(2.1 - 0.7)
    assert s["time_saved_pct"] == pytest.approx(100 * (1 - 0.7 / 2.1))
    md = speedup_markdown(table)
    assert "| 20 | 0.40 | 0.20 | 2.00x | 50.0% |" in md
    assert "average speed-up: 2.33x" in md and "best speed-up: 4.00x (at 40 new tokens)" in md


def test_a_cache_that_changes_the_tokens_is_caught(monkeypatch):
    monkeypatch.setattr(kvlab.bench.cache_speedup, "time_generation", fake_timer(corrupt=True))
    with pytest.raises(AssertionError, match="differ"):
        speedup_table(make_model("gpt2"), [5], prompt_len=4, progress=None)


def test_real_run_on_a_small_model():
    table = speedup_table(make_model("modern"), [6, 12], prompt_len=3, batch_size=2, progress=None)
    assert [r["new_tokens"] for r in table["rows"]] == [6, 12]
    for r in table["rows"]:
        assert r["cached_s"] > 0 and r["uncached_s"] > 0
        assert r["speedup"] == pytest.approx(r["uncached_s"] / r["cached_s"])
    json.dumps(table)


@pytest.mark.parametrize("lengths, match", [([], "non-empty"), ([10, 0], "positive"), ("100", "non-empty"),
                                            ([400], "max_seq_len")])
def test_bad_lengths(lengths, match):
    with pytest.raises(ValueError, match=match):
        speedup_table(make_model("gpt2"), lengths, progress=None)


def test_command_writes_json_and_markdown(tmp_path, capsys):
    out = tmp_path / "table.json"
    assert main(["--speedup-table", "--model", "tiny", "--lengths", "4,8", "--prompt-lens", "3", "--repeats", "1",
                 "--note", "a test", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [r["new_tokens"] for r in data["rows"]] == [4, 8] and data["note"] == "a test"
    assert data["command"].startswith("python -m kvlab.bench --speedup-table")
    md = out.with_suffix(".md").read_text()
    assert "| new tokens | no cache (s) | KV cache (s) | speed-up | time saved |" in md and "a test" in md
    assert "average speed-up" in capsys.readouterr().out


def test_command_rejects_bad_lengths(tmp_path):
    with pytest.raises(SystemExit):
        main(["--speedup-table", "--model", "tiny", "--lengths", "4,x", "--out", str(tmp_path / "t.json")])
    with pytest.raises(SystemExit):
        main(["--speedup-table", "--model", "tiny", "--lengths", "300", "--out", str(tmp_path / "t.json")])


def test_process_clock_counts_cpu_seconds(monkeypatch):
    import time

    ticks = iter(range(100))
    monkeypatch.setattr(time, "process_time", lambda: float(next(ticks)))
    monkeypatch.setattr(kvlab.bench.cache_speedup, "time_generation", fake_timer())
    table = speedup_table(make_model("gpt2"), [10], prompt_len=4, clock="process", progress=None)
    assert table["clock"] == "process" and table["rows"][0]["cached_s"] == table["rows"][0]["uncached_s"] == 1.0
    assert "CPU seconds" in speedup_markdown(table)
    with pytest.raises(ValueError, match="clock"):
        speedup_table(make_model("gpt2"), [10], clock="cpu", progress=None)


def test_the_plot_draws_tokens_per_second_against_length(monkeypatch, tmp_path):
    from kvlab.viz import plot_speedup

    monkeypatch.setattr(kvlab.bench.cache_speedup, "time_generation", fake_timer())
    table = speedup_table(make_model("gpt2"), [10, 20, 40], prompt_len=4, batch_size=2, progress=None)
    fig = plot_speedup(table)
    cached, uncached = fig.axes[0].get_lines()
    assert list(cached.get_xdata()) == [10, 20, 40]
    assert list(cached.get_ydata()) == pytest.approx([200.0] * 3)  # 2 rows x N tokens / (N x 0.01 s)
    assert list(uncached.get_ydata()) == pytest.approx([2 * n / (n * n * 0.001) for n in (10, 20, 40)])
    assert "per second" in fig.axes[0].get_ylabel()
    with pytest.raises(ValueError, match="speedup_table"):
        plot_speedup({"rows": []})


def test_command_plots_and_records_a_pasteable_command(tmp_path, capsys):
    import shlex

    out, plot = tmp_path / "table.json", tmp_path / "speed.png"
    argv = ["--speedup-table", "--model", "tiny", "--lengths", "4,8", "--prompt-lens", "3", "--repeats", "1",
            "--note", "the machine's load: 2", "--out", str(out), "--plot", str(plot)]
    assert main(argv) == 0
    assert shlex.split(json.loads(out.read_text())["command"]) == ["python", "-m", "kvlab.bench", *argv]
    assert plot.stat().st_size > 1000 and f"wrote {plot}" in capsys.readouterr().out


def test_a_longer_context_is_named_by_its_flag(capsys):
    with pytest.raises(SystemExit):
        main(["--speedup-table", "--model", "tiny", "--lengths", "300"])
    assert "pass --max-seq-len 332" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--max-seq-len"):
        speedup_table(make_model("gpt2"), [400], progress=None)
