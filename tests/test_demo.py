"""`minis demo`: the helpers, and one small real run (two training subprocesses) that must agree."""

import json

import pytest
import torch

from minis import demo

SMALL = [
    "--seq-len", "512",
    "--steps", "3",
    "--hidden-size", "64",
    "--intermediate-size", "256",
    "--layers", "2",
    "--vocab-size", "512",
]  # fmt: skip


def test_make_blocks_repeats_the_text_with_bos_and_eos():
    blocks = demo.make_blocks([5, 6, 7], seq_len=4, num_blocks=3, bos_id=0, eos_id=1)
    assert blocks.shape == (3, 4)
    assert blocks.dtype == torch.int64
    assert blocks.flatten().tolist() == [0, 5, 6, 7, 1, 0, 5, 6, 7, 1, 0, 5]


def test_bad_arguments_return_2(capsys):
    assert demo.main(["--heads", "3"]) == 2  # 3 does not divide the hidden size 256
    assert "does not divide" in capsys.readouterr().err
    assert demo.main(["--steps", "0"]) == 2


def test_parser_serves_as_a_parent_and_run_checks_what_it_parsed(capsys):
    """A command line with subcommands takes `build_parser(add_help=False)` as a parent and calls `run(args)`."""
    import argparse

    parser = argparse.ArgumentParser(prog="minis")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("demo", parents=[demo.build_parser(add_help=False)])
    args = parser.parse_args(["demo", "--heads", "3", "--steps", "2"])
    assert (args.heads, args.steps, args.seq_len) == (3, 2, 4096)
    assert demo.run(args) == 2
    assert "--heads 3 does not divide --hidden-size 256" in capsys.readouterr().err
    assert demo.run(parser.parse_args(["demo", "--lr", "0"])) == 2
    assert "--lr must be positive, got 0.0" in capsys.readouterr().err


def test_help_returns_0(capsys):
    from minis.cli import main as cli_main

    assert cli_main(["demo", "--help"]) == 0
    assert "--seq-len" in capsys.readouterr().out


@pytest.mark.slow
def test_small_demo_trains_the_same_model_with_less_memory(tmp_path, capsys):
    code = demo.main([*SMALL, "--json", "--output-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    result = json.loads(out)  # --json: stdout holds the JSON only
    assert result == json.loads((tmp_path / "demo_result.json").read_text())

    with_minis, without = result["with_minis"], result["without_minis"]
    assert with_minis["is_active"] is True and with_minis["minis_env"] == "1"
    assert without["is_active"] is False and without["minis_env"] == "0"
    assert len(with_minis["losses"]) == len(without["losses"]) == 3
    assert result["ok"] and result["losses_match"]
    assert result["max_rel_loss_diff"] <= 1e-4
    for a, b in zip(with_minis["losses"], without["losses"]):
        assert a == pytest.approx(b, rel=1e-4)
    assert with_minis["peak_bytes"] < without["peak_bytes"]
    assert with_minis["tokens_per_s"] > 0 and without["tokens_per_s"] > 0

    report = demo.format_report(result)
    assert "loss with minis" in report and "OK: the same training" in report
