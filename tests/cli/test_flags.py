"""The argv rewriting and config-file loading that sit between the shell and the typed run configs (cli/flags.py),
and the config fields and checks they build on (common/config.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from ft.cli.flags import expand_multi_value_flags, kebab_flags, list_options, load_config_file, pop_config_flag
from ft.common.config import check_choice, check_positive, flag_name, opt
from ft.common.errors import UserError

MULTI = {"--buckets"}


# ---------------------------------------------------------------------------------------------- multi-value flags


def test_expand_several_values() -> None:
    argv = ["--buckets", "a", "b", "--x", "1"]
    assert expand_multi_value_flags(argv, MULTI) == ["--buckets", "a", "--buckets", "b", "--x", "1"]


def test_expand_commas() -> None:
    assert expand_multi_value_flags(["--buckets", "a,b", "c"], MULTI) == [
        "--buckets", "a", "--buckets", "b", "--buckets", "c"]
    assert expand_multi_value_flags(["--buckets", "a, b,,"], MULTI) == ["--buckets", "a", "--buckets", "b"]


def test_expand_inline_value() -> None:
    assert expand_multi_value_flags(["--buckets=a", "pos"], MULTI) == ["--buckets", "a", "pos"]
    assert expand_multi_value_flags(["--buckets=a,b"], MULTI) == ["--buckets", "a", "--buckets", "b"]


def test_expand_stops_at_the_next_flag() -> None:
    argv = ["--buckets", "49x480x720", "-v", "--buckets", "1x32x32", "--lr", "1e-4"]
    assert expand_multi_value_flags(argv, MULTI) == [
        "--buckets", "49x480x720", "-v", "--buckets", "1x32x32", "--lr", "1e-4"]


def test_expand_leaves_other_flags_alone() -> None:
    argv = ["train", "--x", "a", "b", "--y=c,d"]
    assert expand_multi_value_flags(argv, MULTI) == argv
    assert expand_multi_value_flags([], MULTI) == []


def test_expand_flag_without_value_is_kept_for_the_parser() -> None:
    assert expand_multi_value_flags(["--buckets"], MULTI) == ["--buckets"]
    assert expand_multi_value_flags(["--buckets", "--x", "1"], MULTI) == ["--buckets", "--x", "1"]


# ---------------------------------------------------------------------------------------------- kebab flags


def test_kebab_flags() -> None:
    assert kebab_flags(["--dp_degree", "2"]) == ["--dp-degree", "2"]
    assert kebab_flags(["--pretrained_model_name_or_path=a_b/c_d"]) == ["--pretrained-model-name-or-path=a_b/c_d"]


def test_kebab_flags_leaves_values_untouched() -> None:
    argv = ["--caption_column", "my_caption", "--out", "runs/my_run", "-o", "x_y", "--already-kebab", "v_w",
            "--name=a_b"]
    assert kebab_flags(argv) == ["--caption-column", "my_caption", "--out", "runs/my_run", "-o", "x_y",
                                 "--already-kebab", "v_w", "--name=a_b"]


# ---------------------------------------------------------------------------------------------- config files


EXPECTED = {"dp_degree": 2, "buckets": ["49x480x720", "1x32x32"], "lr": 0.0001, "gradient_checkpointing": True,
            "caption_column": "text"}


def test_load_toml(tmp_path: Path) -> None:
    f = tmp_path / "run.toml"
    f.write_text('dp-degree = 2\nbuckets = ["49x480x720", "1x32x32"]\nlr = 1e-4\n'
                 'gradient_checkpointing = true\n"caption-column" = "text"\n')
    assert load_config_file(str(f)) == EXPECTED


def test_load_yaml(tmp_path: Path) -> None:
    for name in ("run.yaml", "run.yml"):
        f = tmp_path / name
        f.write_text("dp_degree: 2\nbuckets:\n  - 49x480x720\n  - 1x32x32\nlr: 0.0001\n"
                     "gradient-checkpointing: true\n--caption-column: text\n")
        assert load_config_file(str(f)) == EXPECTED


def test_load_json(tmp_path: Path) -> None:
    f = tmp_path / "run.json"
    f.write_text(json.dumps({"--dp-degree": 2, "buckets": ["49x480x720", "1x32x32"], "lr": 1e-4,
                             "gradient_checkpointing": True, "caption-column": "text"}))
    assert load_config_file(str(f)) == EXPECTED


def test_empty_yaml_is_an_empty_config(tmp_path: Path) -> None:
    f = tmp_path / "run.yaml"
    f.write_text("")
    assert load_config_file(str(f)) == {}


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such file") as e:
        load_config_file(str(tmp_path / "absent.toml"))
    assert "absent.toml" in str(e.value)


@pytest.mark.parametrize("name,text", [
    ("bad.toml", "dp_degree = = 2\n"),
    ("bad.yaml", "a: [1, 2\nb: :\n"),
    ("bad.json", '{"dp_degree": 2,'),
])
def test_bad_syntax(tmp_path: Path, name: str, text: str) -> None:
    f = tmp_path / name
    f.write_text(text)
    with pytest.raises(UserError, match="could not be parsed") as e:
        load_config_file(str(f))
    assert name in str(e.value)


def test_unsupported_config_suffix(tmp_path: Path) -> None:
    f = tmp_path / "run.ini"
    f.write_text("[a]\nb=1\n")
    with pytest.raises(UserError, match="run.ini"):
        load_config_file(str(f))


@pytest.mark.parametrize("name,text", [("list.json", "[1, 2]"), ("scalar.yaml", "just a string\n")])
def test_config_must_be_a_table(tmp_path: Path, name: str, text: str) -> None:
    f = tmp_path / name
    f.write_text(text)
    with pytest.raises(UserError, match="table of flag = value pairs"):
        load_config_file(str(f))


# ---------------------------------------------------------------------------------------------- --config


def test_pop_config_flag() -> None:
    assert pop_config_flag(["train", "--config", "run.toml", "--lr", "1"]) == (["train", "--lr", "1"], "run.toml")
    assert pop_config_flag(["--config=run.yaml", "--x"]) == (["--x"], "run.yaml")
    assert pop_config_flag(["--lr", "1"]) == (["--lr", "1"], None)
    assert pop_config_flag([]) == ([], None)


def test_pop_config_flag_last_one_wins() -> None:
    assert pop_config_flag(["--config", "a.toml", "--config=b.toml"]) == ([], "b.toml")


def test_pop_config_flag_without_value_is_left_in_argv() -> None:
    assert pop_config_flag(["--lr", "1", "--config"]) == (["--lr", "1", "--config"], None)


# ---------------------------------------------------------------------------------------------- helpers


@dataclass
class _Toy:
    dp_degree: int = opt(1, "data-parallel degree")
    buckets: list[str] = opt(["1x32x32"], "buckets")
    extra: list[int] | None = opt(None, "optional list")
    name: str = opt("x", "a name")


def test_flag_name_and_list_options() -> None:
    assert flag_name("dp_degree") == "--dp-degree"
    assert list_options(_Toy) == {"--buckets", "--extra"}


def test_opt_list_default_is_copied_per_instance() -> None:
    a, b = _Toy(), _Toy()
    a.buckets.append("9x32x32")
    assert b.buckets == ["1x32x32"]


def test_check_choice_and_positive() -> None:
    check_choice("head", ["head", "uniform"], "frame_sampling")
    with pytest.raises(UserError, match="--frame-sampling 'middle' is not one of: head, uniform"):
        check_choice("middle", ["head", "uniform"], "frame_sampling")
    check_positive(1, "lr")
    check_positive(0, "warmup_steps", allow_zero=True)
    with pytest.raises(UserError, match="--lr must be > 0"):
        check_positive(0, "lr")
    with pytest.raises(UserError, match="--warmup-steps must be >= 0"):
        check_positive(-1, "warmup_steps", allow_zero=True)
