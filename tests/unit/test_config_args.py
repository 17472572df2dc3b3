"""The argparse built from the config dataclasses: round trips, JSON, help, validation."""

from __future__ import annotations

import dataclasses

import pytest

from orbit.config import GROUPS, TrainConfig, build_parser, parse_args, to_argv


def test_every_field_is_a_flag_with_help() -> None:
    help_text = build_parser().format_help()
    for group_name, cls in GROUPS.items():
        assert f"{group_name} ({cls.__name__})" in help_text
        for f in dataclasses.fields(cls):
            assert "--" + f.name.replace("_", "-") in help_text
            assert f.metadata["help"], f"{cls.__name__}.{f.name} has no help text"


def test_flags_land_in_their_groups_and_round_trip_through_argv() -> None:
    cfg = parse_args(["--lr", "3e-4", "--target-modules", "q_proj,v_proj", "--no-resume",
                      "--adapter", "oft", "--oft-block-size", "16", "--quant-format", "nvfp4",
                      "--use-tis", "--prompt-data", "a.jsonl", "--n-samples-per-prompt", "4"])
    assert cfg.optim.lr == 3e-4 and cfg.adapter.target_modules == ["q_proj", "v_proj"]
    assert cfg.ckpt.resume is False and cfg.adapter.adapter == "oft" and cfg.adapter.oft_block_size == 16
    assert cfg.precision.quant_format == "nvfp4" and cfg.algo.use_tis is True
    assert parse_args(to_argv(cfg)) == cfg
    assert parse_args([]) == TrainConfig()


def test_json_save_and_load(tmp_path) -> None:
    cfg = parse_args(["--kl-coef", "0.05", "--save", str(tmp_path / "run"), "--prompt-data", "x"])
    cfg.save(tmp_path / "run" / "config.json")
    assert TrainConfig.load(tmp_path / "run" / "config.json") == cfg


def test_load_rejects_unknown_fields() -> None:
    d = TrainConfig().to_dict()
    d["optim"]["learning_rate"] = 1.0
    with pytest.raises(ValueError, match="learning_rate"):
        TrainConfig.from_dict(d)


def test_bad_choice_is_rejected_by_argparse() -> None:
    with pytest.raises(SystemExit):
        parse_args(["--quant-format", "int3"])


@pytest.mark.parametrize(("argv", "message"), [
    (["--rollout-batch-size", "4", "--n-samples-per-prompt", "4", "--global-batch-size", "5"], "global-batch-size"),
    (["--rollout-batch-size", "0"], "rollout-batch-size"),
    (["--trainer-backend", "megatron"], "not built yet"),
    (["--megatron-load", "/ckpt"], "not built yet"),
    (["--rollout-backend", "sglang", "--adapter", "oft"], "LoRA"),
    (["--eps-clip-c", "0.5"], "eps-clip-c"),
    (["--qmm-routes", "/nonexistent/routes.json"], "--qmm-routes: /nonexistent/routes.json: cannot read"),
])
def test_validate_names_the_flag(argv: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_args(["--prompt-data", "x", *argv]).validate()


def test_validate_requires_prompt_data() -> None:
    with pytest.raises(ValueError, match="prompt-data"):
        parse_args([]).validate()


def test_num_steps_from_rollout_count_and_epochs() -> None:
    cfg = parse_args(["--rollout-batch-size", "4", "--num-epoch", "2"])
    assert cfg.num_steps(10) == 6  # ceil(10 / 4) * 2
    cfg = parse_args(["--rollout-batch-size", "4", "--num-epoch", "2", "--num-rollout", "3"])
    assert cfg.num_steps(10) == 3
    cfg = parse_args(["--rollout-batch-size", "4", "--num-epoch", "1", "--num-rollout", "30"])
    assert cfg.num_steps(10) == 3  # epochs cap the requested rollouts
    cfg = parse_args(["--rollout-batch-size", "4", "--n-samples-per-prompt", "8"])
    assert cfg.global_batch() == 32
