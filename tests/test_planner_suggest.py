"""`minis plan --suggest`: the cheapest setting that fits, tried in a fixed order (src/minis/planner/suggest.py)."""

import pytest
from test_planner import small_config

from minis.planner import PlanError, TrainingSetup, predict_peak
from minis.planner.suggest import candidate_setups, format_suggestion, suggest

SEQ = 2048


def test_candidates_go_from_no_checkpointing_to_offloading_and_keep_the_fixed_choices():
    setup = TrainingSetup(method="lora", attn="eager", zero_stage=3, world_size=2)
    names = [name for name, _ in candidate_setups(setup)]
    assert names == ["no activation checkpointing", "checkpointing of every 4th layer",
                     "checkpointing of every 2nd layer", "checkpointing of every layer", "checkpointing, checkpoints offloaded to CPU",
                     "checkpoints and optimizer state offloaded to CPU"]
    setups = [candidate for _, candidate in candidate_setups(setup)]
    assert [s.grad_ckpt for s in setups] == [False, True, True, True, True, True]
    assert [s.every_n_layers for s in setups] == [1, 4, 2, 1, 1, 1]
    assert [s.offload_activations for s in setups] == [False, False, False, False, True, True]
    assert all((s.method, s.attn, s.zero_stage, s.world_size) == ("lora", "eager", 3, 2) for s in setups)
    # Without a sharding engine there is nothing that offloads the optimizer, and without selective checkpointing
    # (transformers < 5.23) no every-n-layers candidate.
    plain = [name for name, _ in candidate_setups(TrainingSetup(), selective=False)]
    assert plain == ["no activation checkpointing", "checkpointing of every layer",
                     "checkpointing, checkpoints offloaded to CPU"]


def _peaks(config):
    return {key: predict_peak(config, SEQ, TrainingSetup(grad_ckpt=gc, offload_activations=off)).total
            for key, gc, off in (("none", False, False), ("ckpt", True, False), ("offload", True, True))}


def test_suggest_picks_the_first_setting_that_fits():
    config = small_config(layers=4)
    peaks = _peaks(config)
    assert peaks["offload"] < peaks["ckpt"] < peaks["none"]
    roomy = suggest(config, SEQ, peaks["none"] + (1 << 20))
    assert roomy["fits"] and roomy["name"] == "no activation checkpointing" and len(roomy["tried"]) == 1
    tight = suggest(config, SEQ, (peaks["offload"] + peaks["ckpt"]) // 2)
    assert tight["fits"] and tight["name"] == "checkpointing, checkpoints offloaded to CPU"
    assert tight["setup"].offload_activations and tight["peak"].total == peaks["offload"]
    text = format_suggestion(tight)
    assert 'activation_checkpointing_kwargs={"offload": True}' in text
    assert "config.mini_sequence_offload = True" in text


def test_suggest_says_when_nothing_fits():
    result = suggest(small_config(layers=4), SEQ, 1 << 20)
    assert not result["fits"]
    assert "none fits" in format_suggestion(result)


@pytest.mark.parametrize("seq", [0, -5, 2.5, True])
def test_suggest_rejects_a_bad_length(seq):
    with pytest.raises(PlanError, match="--suggest needs --seq"):
        suggest(small_config(), seq, "80GiB")


def test_the_command_line_suggests_and_rejects_what_it_cannot_answer(tmp_path, capsys):
    from minis.cli import main

    path = tmp_path / "config.json"
    small_config(layers=4).to_json_file(path)
    assert main(["plan", "--model", str(path), "--suggest", "--gpu-mem", "80GiB"]) == 2
    assert "--suggest needs --seq N and --gpu-mem SIZE" in capsys.readouterr().err
    assert main(["plan", "--model", str(path), "--suggest", "--seq", "256", "--gpu-mem", "80GiB", "--max-seq"]) == 2
    assert "give one of them" in capsys.readouterr().err
    assert main(["plan", "--model", str(path), "--suggest", "--seq", str(SEQ), "--gpu-mem", "80GiB"]) == 0
    assert "suggestion: no activation checkpointing" in capsys.readouterr().out
    assert main(["plan", "--model", str(path), "--suggest", "--seq", str(SEQ), "--gpu-mem", "1MiB"]) == 1
    assert "none fits" in capsys.readouterr().out
