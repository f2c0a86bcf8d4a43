"""One definition per setting: a process's frozen config dataclass, from which its CLI and env vars derive.

Runs in any process; owns no socket; imports no event loop. A setting is one dataclass field declared
with `setting(...)`: its default, its help text and (optionally) its flag name live there, and nowhere
else. `parse_config` builds the argparse parser from the fields and fills the dataclass with, for each
field, the first of: the command line, the environment variable `<env_prefix><FIELD_NAME>`, the field's
default. Values are converted by the field's annotation (str, int, float, bool, Optional[...],
tuple[str, ...]); a bad value from either source exits with code 2 (argparse's convention) naming the
flag or the variable. Booleans take `--x` / `--no-x` on the command line and 1/true/yes/on or
0/false/no/off (any case) in the environment: any other text is an error, never "true because non-empty".
A `repeat` setting is an option given any number of times (`--label a=1 --label b=2`; in the environment,
comma-separated): its `parse` turns the list of texts into the value and raises ValueError naming the flag.

Validation that spans fields stays in the dataclass's `__post_init__`, which raises ValueError naming
the flag; `parse_config` turns that into a usage error too.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import types
import typing
from typing import Any, Callable, Mapping, Optional, Sequence, TypeVar

T = TypeVar("T")

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def parse_bool(text: str) -> bool:
    """1/true/yes/on -> True, 0/false/no/off -> False (any case); anything else is a ValueError."""
    low = text.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError("expected one of %s or %s, got %r" % ("/".join(_TRUE), "/".join(_FALSE), text))


def finite_number(text: str) -> float:
    """A float setting: nan and inf are refused (the agent's --stop-grace nan or inf never came due, so a
    replica that ignored SIGTERM was never killed; every other time setting has the same trap)."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("%r is not a finite number" % text)
    return value


def parse_csv(text: str) -> tuple[str, ...]:
    """A comma-separated list, blanks dropped."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def setting(default: Any = dataclasses.MISSING, *, help: str, flag: Optional[str] = None,
            default_factory: Any = dataclasses.MISSING, env: bool = True, cli: bool = True,
            parse: Optional[Callable[[Any], Any]] = None, choices: Optional[Sequence[Any]] = None,
            metavar: Optional[str] = None, default_help: Optional[str] = None, repeat: bool = False) -> Any:
    """A config field. `flag`: the option's name when it is not `--field-name`; `env`/`cli`: whether the
    environment variable / the option exists; `parse`: text -> value when the annotation is not enough;
    `default_help`: how `--help` describes a computed default; `repeat`: the option may be given several
    times, and `parse` gets the list of texts (default: a tuple of them)."""
    meta = {"help": help, "flag": flag, "env": env, "cli": cli, "parse": parse, "choices": choices,
            "metavar": metavar, "default_help": default_help, "repeat": repeat}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def env_name(env_prefix: str, field_name: str) -> str:
    return env_prefix + field_name.upper()


def _base_type(annotation: Any) -> Any:
    """int for int and Optional[int]; tuple for tuple[str, ...]."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(args[0]) if len(args) == 1 else str
    if origin is not None:
        return origin
    return annotation


def _converter(f: dataclasses.Field[Any], annotation: Any) -> Callable[[Any], Any]:
    parse = f.metadata.get("parse")
    if parse is not None:
        return parse
    if f.metadata.get("repeat"):
        return tuple
    base = _base_type(annotation)
    if base is bool:
        return parse_bool
    if base is tuple:
        return parse_csv
    if base is float:
        return finite_number
    if base in (int, str):
        return base
    raise TypeError("setting %s: no text conversion for %r (give parse=)" % (f.name, annotation))


def _flag(f: dataclasses.Field[Any]) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _settings(cls: type) -> list[tuple[dataclasses.Field[Any], Any]]:
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if f.metadata.get("help") is not None]


def _default_text(f: dataclasses.Field[Any]) -> str:
    if f.metadata.get("default_help"):
        return str(f.metadata["default_help"])
    if f.default is not dataclasses.MISSING:
        return "none" if f.default is None else repr(f.default) if isinstance(f.default, str) else str(f.default)
    return "required" if f.default_factory is dataclasses.MISSING else "computed"


def build_parser(cls: type, *, prog: str, description: str, env_prefix: Optional[str]) -> argparse.ArgumentParser:
    """The argparse parser of `cls`'s settings (every default None: unset options fall back later)."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    for f, annotation in _settings(cls):
        if not f.metadata["cli"]:
            continue
        text = _default_text(f)
        where = text if text == "required" else "default %s" % text
        if env_prefix is not None and f.metadata["env"]:
            where += "; env %s" % env_name(env_prefix, f.name)
        if f.metadata.get("repeat"):
            where += "; repeatable"
        help_text = "%s (%s)" % (f.metadata["help"], where)
        if f.metadata.get("repeat"):
            p.add_argument(_flag(f), dest=f.name, action="append", default=None, metavar=f.metadata["metavar"],
                           help=help_text)
            continue
        if _base_type(annotation) is bool:
            p.add_argument(_flag(f), dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                           help=help_text)
            continue
        p.add_argument(_flag(f), dest=f.name, default=None, type=_converter(f, annotation),
                       choices=f.metadata["choices"], metavar=f.metadata["metavar"], help=help_text)
    return p


def parse_config(cls: type[T], argv: Optional[Sequence[str]] = None, *, prog: str, description: str,
                 env_prefix: Optional[str] = None, environ: Optional[Mapping[str, str]] = None,
                 **fixed: Any) -> T:
    """`cls` from the command line, then the environment, then the defaults; exit 2 on a bad value.
    `fixed`: values for fields that have no option (computed by the caller)."""
    environ = os.environ if environ is None else environ
    parser = build_parser(cls, prog=prog, description=description, env_prefix=env_prefix)
    ns = parser.parse_args(argv)
    values: dict[str, Any] = dict(fixed)
    for f, annotation in _settings(cls):
        value = getattr(ns, f.name, None)
        repeat = f.metadata.get("repeat")
        if value is not None and repeat:
            try:
                value = _converter(f, annotation)(value)
            except ValueError as exc:
                parser.error(str(exc))
        if value is None and env_prefix is not None and f.metadata["env"]:
            name = env_name(env_prefix, f.name)
            text = environ.get(name)
            if text is not None and text != "":
                try:
                    value = _converter(f, annotation)(list(parse_csv(text)) if repeat else text)
                except ValueError as exc:
                    parser.error("$%s: %s" % (name, exc))
                choices = f.metadata["choices"]
                if choices is not None and value not in choices:
                    parser.error("$%s: %r is not one of %s" % (name, value, ", ".join(map(str, choices))))
        if value is not None:
            values[f.name] = value
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING \
                and f.name not in values:
            hint = " (or set $%s)" % env_name(env_prefix, f.name) if env_prefix and f.metadata["env"] else ""
            parser.error("%s is required%s" % (_flag(f), hint))
    try:
        return cls(**values)
    except ValueError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits
