"""Every `python -m kvlab.<module>` is a documented command or says which commands exist (exit 2),
never a traceback, a RuntimeWarning or silence; the nearest real flag is named for an unknown one."""

import argparse
import os
import pkgutil
import subprocess
import sys

import pytest

import kvlab
from kvlab import _cli

COMMANDS = set(_cli.COMMANDS)


def all_modules() -> list[str]:
    names = ["kvlab"]
    for info in pkgutil.walk_packages(kvlab.__path__, prefix="kvlab."):
        names.append(info.name)
    return sorted(names)


def run(*args, stdin=None, env=None, timeout=120):
    full_env = {**os.environ, "PYTHONWARNINGS": "error::RuntimeWarning", **(env or {})}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, input=stdin, env=full_env,
                          timeout=timeout)


def test_the_walk_finds_the_commands_and_the_library():
    names = all_modules()
    assert {f"kvlab.{c}" for c in COMMANDS} <= set(names)
    assert {"kvlab.viz", "kvlab.seq2seq", "kvlab.course", "kvlab.course.checks", "kvlab.course.checks.gpt",
            "kvlab.student", "kvlab.generation.cli", "kvlab.bench.__main__"} <= set(names)


@pytest.mark.parametrize("module", all_modules())
def test_every_module_is_a_command_or_lists_the_commands(module):
    name = module.removeprefix("kvlab.")
    result = run("-m", module, "--help")
    output = result.stdout + result.stderr
    assert "Traceback" not in output and "RuntimeWarning" not in output, output
    if name in COMMANDS or name in ("kvlab", "__main__") or name in {f"{c}.__main__" for c in COMMANDS}:
        assert result.returncode == 0, output
        assert "usage:" in result.stdout
        return
    assert result.returncode == 2, output
    assert f"python -m {module}: {module} is a library module, not a command" in result.stderr
    assert "kvlab's commands" in result.stderr and "python -m kvlab.generate" in result.stderr


def test_the_issues_commands_that_did_nothing():
    viz = run("-m", "kvlab.viz", "dashboard")
    assert viz.returncode == 2 and "did you mean python -m kvlab.dashboard?" in viz.stderr
    seq = run("-m", "kvlab.seq2seq", "--help")
    assert seq.returncode == 2 and "train_toy" in seq.stderr and "kvlab's commands" in seq.stderr
    for result in (viz, seq):
        assert "Traceback" not in result.stderr and "RuntimeWarning" not in result.stderr
    missing = run("-m", "kvlab.nothing_here")
    assert missing.returncode == 2 and "kvlab has no module 'nothing_here'" in missing.stderr


def test_python_dash_m_kvlab_lists_and_runs_the_commands():
    bare = run("-m", "kvlab")
    assert bare.returncode == 2 and "kvlab's commands" in bare.stderr
    typo = run("-m", "kvlab", "trian")
    assert typo.returncode == 2 and "did you mean train?" in typo.stderr
    dispatched = run("-m", "kvlab", "generate", "--help")
    assert dispatched.returncode == 0 and "--prompt-file" in dispatched.stdout


def test_the_guard_reads_the_module_python_is_starting(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["-m"])
    monkeypatch.setattr(sys, "orig_argv", [sys.executable, "-W", "ignore", "-m", "kvlab.viz", "x"], raising=False)
    assert _cli._module_run_by_dash_m() == "kvlab.viz"
    monkeypatch.setattr(sys, "orig_argv", [sys.executable, "-mkvlab.cache"], raising=False)
    assert _cli._module_run_by_dash_m() == "kvlab.cache"
    monkeypatch.setattr(sys, "argv", ["/path/to/script.py"])  # any process that is not `python -m ...` starting
    assert _cli._module_run_by_dash_m() is None
    _cli.refuse_non_command()  # and then the guard does nothing


@pytest.mark.parametrize("typed, expected", [
    ("--max_tokens", "(did you mean --max-new-tokens?)"),
    ("--top_k", "(did you mean --top-k?)"),
    ("--kvcaching", "(the KV cache is on by default; --no-cache turns it off)"),
    ("--temprature", "(did you mean --temperature?)"),
    ("--zzzz", ""),
])
def test_unknown_flags_get_the_nearest_real_one(typed, expected):
    parser = _cli.Parser(prog="p")
    for flag in ("--max-new-tokens", "--top-k", "--temperature", "--no-cache"):
        parser.add_argument(flag)
    assert parser.suggestion(typed) == (f" {expected}" if expected else "")


def test_unknown_flags_are_reported_before_a_missing_required_one(capsys):
    parser = _cli.Parser(prog="p")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int)
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["--max_tokens", "5"])
    assert info.value.code == 2
    assert "--max_tokens (did you mean --max-new-tokens?)" in capsys.readouterr().err
    assert parser.parse_args(["--prompt", "x", "--max", "3"]).max_new_tokens == 3  # argparse's prefixes still work


def test_shape_flags_follow_the_preset_rules():
    parser = argparse.ArgumentParser()
    _cli.add_shape_arguments(parser)
    preset = dict(d_model=64, n_heads=4, n_kv_heads=2, d_ff=200, mlp="swiglu")
    args = parser.parse_args(["--n-heads", "8", "--d-model", "128"])
    assert _cli.apply_shape_flags(preset, args) == dict(d_model=128, n_heads=8, mlp="swiglu")
    assert _cli.apply_shape_flags(preset, parser.parse_args(["--d-ff", "96", "--pos", "sinusoidal"]))["d_ff"] == 96
    with pytest.raises(ValueError, match="--d-model 30 is not divisible by the preset's 4 heads"):
        _cli.apply_shape_flags(preset, parser.parse_args(["--d-model", "30"]))
    assert _cli.shape_flags_given(parser.parse_args(["--d-ff", "8", "--window", "4"])) == ["--d-ff", "--window"]


def test_command_line_pastes_back():
    import shlex

    argv = ["--note", "the machine's load was 11", "--out", "a b.json"]
    line = _cli.command_line("kvlab.bench", argv)
    assert shlex.split(line) == ["python", "-m", "kvlab.bench", *argv]


def test_the_readmes_commands_parse():
    """Each `python -m kvlab.<command>` line of README.md's command list is accepted by its parser."""
    import importlib
    import re
    import shlex
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("Commands (each has `--help`", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    parsers = {"train": "kvlab.train.cli", "generate": "kvlab.generation.cli", "bench": "kvlab.bench.cli",
               "dashboard": "kvlab.dashboard"}
    seen = set()
    for line in block.splitlines():
        match = re.match(r"python -m kvlab\.(\w+) (.*)", line.strip())
        if not match or match.group(1) not in parsers:
            continue
        command, rest = match.groups()
        argv = shlex.split(rest, comments=True)
        parser = importlib.import_module(parsers[command]).build_parser()
        parser.parse_args(argv)  # a usage error would exit with status 2
        seen.add(command)
    assert seen == set(parsers)
