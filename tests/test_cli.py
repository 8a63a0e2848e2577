"""`minis` command line: subcommands, help, and one exit code (2) for every kind of bad input."""

import os
import subprocess
import sys

import pytest

from minis import demo, planner
from minis.cli import build_parser, main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_top_level_help_lists_both_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "{demo,plan}" in out and "peak GPU memory" in out and "with and without minis" in out


@pytest.mark.parametrize("command,option", [("plan", "--gpu-mem"), ("demo", "--seq-len")])
def test_subcommand_help_shows_its_options(command, option, capsys):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: minis {command}") and option in out


@pytest.mark.parametrize(
    "argv,words",
    [
        ([], ["required", "{demo,plan}"]),
        (["train"], ["invalid choice", "'train'", "demo", "plan"]),
        (["plan", "--seq", "8"], ["--model", "required"]),  # argparse: a missing required option
        (["plan", "--model", "llama-3-8b", "--seq", "abc"], ["'abc'", "not an integer"]),  # argparse: a bad type
        (["plan", "--model", "llama-3-8b", "--seq", "8", "--bogus"], ["unrecognized", "--bogus"]),
        (["plan", "--model", "llama-9", "--seq", "8"], ["minis plan: error:", "'llama-9'", "llama-3-8b"]),
        (["plan", "--model", "llama-3-8b", "--max-seq", "--gpu-mem", "-3GB"], ["minis plan: error:", "'-3GB'"]),
        (["plan", "--model", "gemma-2-9b", "--seq", "8"], ["minis plan: error:", "sdpa", "eager or flash"]),
        (["demo", "--heads", "3"], ["minis demo: error:", "does not divide"]),
        (["demo", "--steps", "x"], ["minis demo: error:", "'x'"]),
    ],
)
def test_bad_input_exits_2_with_an_error_line(argv, words, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error: " in err.splitlines()[-1], err
    for word in words:
        assert word in err, (word, err)


def test_subcommands_run_their_modules_runner():
    parser = build_parser()
    assert parser.parse_args(["plan", "--model", "llama-3-8b", "--seq", "8"]).run is planner.run
    assert parser.parse_args(["demo"]).run is demo.run


def test_each_command_module_has_build_parser_run_and_main(capsys):
    for module in (demo, planner):
        assert callable(module.build_parser) and callable(module.run) and callable(module.main)
        assert module.main(["--help"]) == 0
        assert module.build_parser().prog in capsys.readouterr().out


def test_python_dash_m_minis():
    for argv, code, stream, word in ((["--help"], 0, "stdout", "plan"),
                                     (["plan", "--model", "nope", "--seq", "8"], 2, "stderr", "'nope'")):
        result = subprocess.run([sys.executable, "-m", "minis", *argv], capture_output=True, text=True, timeout=300,
                                cwd=REPO, check=False)
        assert result.returncode == code, result.stderr
        assert word in getattr(result, stream)
