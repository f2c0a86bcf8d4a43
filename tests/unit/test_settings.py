"""runtime.settings: one dataclass field per setting, from which the CLI option and the env var derive."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pytest

from runtime.settings import parse_bool, parse_config, setting


@dataclass(frozen=True)
class Demo:
    endpoint: str = setting(help="where")
    count: int = setting(3, help="how many")
    ratio: Optional[float] = setting(None, help="a share")
    loud: bool = setting(False, help="shout")
    names: tuple[str, ...] = setting((), help="comma-separated names")
    level: str = setting("INFO", help="level", parse=str.upper, choices=("INFO", "DEBUG"))
    secret: str = setting("s", help="not on the command line", cli=False)
    home: str = setting("h", help="no env var", env=False)
    tags: tuple[str, ...] = setting((), help="a tag", flag="--tag", repeat=True)
    pairs: dict[str, str] = setting(default_factory=dict, help="k=v", flag="--pair", repeat=True,
                                    parse=lambda items: dict(_pair(i) for i in items))

    def __post_init__(self) -> None:
        if self.count < 0:
            raise ValueError("--count must be >= 0")


def _pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep:
        raise ValueError("--pair must look like key=value, got %r" % text)
    return key, value


def parse(argv: list[str], **env: str) -> Demo:
    return parse_config(Demo, argv, prog="demo", description="d", env_prefix="DEMO_", environ=env)


def test_cli_over_env_over_default() -> None:
    d = parse(["--endpoint", "tcp://a:1"])
    assert (d.count, d.ratio, d.loud, d.names, d.level) == (3, None, False, (), "INFO")
    d = parse(["--endpoint", "tcp://a:1"], DEMO_COUNT="7", DEMO_RATIO="0.5", DEMO_LOUD="yes", DEMO_NAMES="a, b,")
    assert (d.count, d.ratio, d.loud, d.names) == (7, 0.5, True, ("a", "b"))
    d = parse(["--endpoint", "tcp://a:1", "--count", "9", "--no-loud"], DEMO_COUNT="7", DEMO_LOUD="1")
    assert (d.count, d.loud) == (9, False)
    assert parse([], DEMO_ENDPOINT="tcp://env:1").endpoint == "tcp://env:1"


def test_an_empty_env_value_means_unset() -> None:
    assert parse(["--endpoint", "x"], DEMO_COUNT="").count == 3


def test_options_without_cli_or_env_keep_their_default() -> None:
    d = parse(["--endpoint", "x"], DEMO_HOME="elsewhere", DEMO_SECRET="z")
    assert d.home == "h" and d.secret == "z"
    with pytest.raises(SystemExit):
        parse(["--endpoint", "x", "--secret", "z"])


@pytest.mark.parametrize("argv, env, says", [
    ([], {}, "--endpoint is required (or set $DEMO_ENDPOINT)"),
    (["--endpoint", "x", "--count", "-1"], {}, "--count must be >= 0"),
    (["--endpoint", "x"], {"DEMO_LOUD": "sure"}, "$DEMO_LOUD"),
    (["--endpoint", "x"], {"DEMO_COUNT": "many"}, "$DEMO_COUNT"),
    (["--endpoint", "x"], {"DEMO_LEVEL": "loud"}, "$DEMO_LEVEL"),
    (["--endpoint", "x", "--level", "loud"], {}, "--level"),
    # a float setting is a finite number: the agent's --stop-grace nan or inf never came due (no SIGKILL)
    (["--endpoint", "x", "--ratio", "nan"], {}, "argument --ratio: invalid finite_number value: 'nan'"),
    (["--endpoint", "x", "--ratio", "-inf"], {}, "argument --ratio"),
    (["--endpoint", "x"], {"DEMO_RATIO": "inf"}, "$DEMO_RATIO: 'inf' is not a finite number"),
])
def test_bad_values_exit_2_naming_the_knob(argv: list[str], env: dict[str, str], says: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse(argv, **env)
    assert info.value.code == 2 and says in capsys.readouterr().err


def test_parse_bool_refuses_what_is_not_a_boolean() -> None:
    assert [parse_bool(t) for t in ("1", "TRUE", " on ", "0", "False", "off")] == [True] * 3 + [False] * 3
    with pytest.raises(ValueError):
        parse_bool("2")


def test_a_repeatable_option_collects_every_occurrence_cli_over_env() -> None:
    d = parse(["--endpoint", "x", "--tag", "a", "--tag", "b,c", "--pair", "k=1", "--pair", "j=2"])
    assert d.tags == ("a", "b,c") and d.pairs == {"k": "1", "j": "2"}
    d = parse(["--endpoint", "x"], DEMO_TAGS="a, b", DEMO_PAIRS="k=1,j=2")
    assert d.tags == ("a", "b") and d.pairs == {"k": "1", "j": "2"}
    d = parse(["--endpoint", "x", "--pair", "z=9"], DEMO_PAIRS="k=1")
    assert d.pairs == {"z": "9"}
    assert parse(["--endpoint", "x"]).pairs == {}


def test_a_bad_repeatable_value_exits_2_with_its_parsers_message(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse(["--endpoint", "x", "--pair", "k=1", "--pair", "nope"])
    assert exc.value.code == 2 and "--pair must look like key=value, got 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse(["--endpoint", "x"], DEMO_PAIRS="nope")
    assert "$DEMO_PAIRS" in capsys.readouterr().err
