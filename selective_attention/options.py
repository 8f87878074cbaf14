"""Command-line options from dataclasses: one mechanism for every subcommand and config.

Every subcommand's options are the fields of a dataclass, turned into argparse options by one function,
:func:`add_options`: ``train`` takes :class:`~selective_attention.train.TrainConfig` (its ``model``, a
``GPTConfig``, flattened: ``--n_layer`` beside ``--lr``), ``demo`` :class:`~selective_attention.demo.DemoConfig`,
and ``eval``, ``generate``, ``bench``, ``seed-example`` the option classes below. A field ``name: T = default``
becomes ``--name VALUE`` or ``--name=VALUE``, with:

* its type from the annotation: ``bool`` takes ``--name``, ``--name=true/false`` (yes/no, 1/0), and a default-true
  one also ``--no_name``; ``X | None`` also takes ``none``; ``Sequence[int]`` is comma-separated (``0,2``);
  ``list[int]`` takes several values; ``metadata={"type": f}`` gives a parser of its own (a range check);
* its ``--help`` line from ``metadata={"help": ...}``, else the comment at the end of the field's line, and its
  default (from the instance the options override, so ``train --help`` shows the training defaults);
* dashes and underscores alike in option names (``--selection-layers`` = ``--selection_layers``).

Why argparse built from the dataclasses rather than tyro or jsonargparse: no new dependency for a command of
six subcommands, ``--help`` and usage errors in the standard form (``argument --batches: must be an int >= 1,
got '0'``), and the ``--key=value`` spelling the README and scripts use keeps working; the whole mechanism is
the few functions below. Values are checked twice on purpose: argparse checks each value's type; the config's
``__post_init__`` checks ranges and the rules across fields (``error: --n_layer=0 is invalid: ...``, exit 2).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import functools
import inspect
import io
import math
import os
import re
import textwrap
import tokenize
import types
import typing
from collections.abc import Collection, Sequence

__all__ = ["add_options", "parse_options", "build", "values_of", "UsageError", "OptionParser", "help_formatter",
           "normalise_argv", "option_strings", "refuse_unknown", "int_at_least", "seed_int", "seed_error", "SEED_MAX",
           "finite_number", "positive_int", "non_negative_int", "field_comments"]  # fmt: skip


# --- options from dataclasses ------------------------------------------------------------------------
class UsageError(ValueError):
    """A bad command line (an unknown option, a value of the wrong type): argparse's message."""

    def __init__(self, message: str, parser: argparse.ArgumentParser | None = None) -> None:
        super().__init__(message)
        self.parser = parser


class OptionParser(argparse.ArgumentParser):
    """argparse that raises :class:`UsageError` instead of exiting, so library callers get a ValueError."""

    def error(self, message: str) -> typing.NoReturn:
        if message.endswith("expected one argument"):  # the value began with '-': argparse took it for an option
            option = message.split()[1].rstrip(":")
            message += f" (give it as {option}=VALUE; a value that begins with '-' must be given so)"
        raise UsageError(message, self)


def help_formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.HelpFormatter(prog, max_help_position=34)


def int_at_least(low: int, hint: str = ""):
    """An argparse ``type``: an int >= ``low``; argparse reports a bad one naming the option."""

    def parse(text: str) -> int:
        try:
            val = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int >= {low}, got {text!r}{hint}") from None
        if val < low:
            raise argparse.ArgumentTypeError(f"must be an int >= {low}, got {text!r}{hint}")
        return val

    parse.metavar = "INT"
    return parse


SEED_MAX = 2**32 - 1  # torch's CPU generator keeps a seed's low 32 bits: a larger |seed| repeats a smaller one's run


def seed_error(val: int) -> str | None:
    """Why ``val`` is no seed (None when it is one): ``|val| <= SEED_MAX``. A seed that torch would reduce to another
    seed's low 32 bits repeated that seed's run to the bit, silently (``--seed=4294967296`` trained ``--seed=0``'s
    model). A negative seed ``-s`` runs as ``2**32 - s`` (its two's complement's low 32 bits), as it always did."""
    if abs(val) <= SEED_MAX:
        return None
    return (
        f"{val} is beyond 2**32 - 1 in absolute value: torch's generator keeps a seed's low 32 bits, so it would "
        f"repeat the run of seed {val % 2**32}; pass an int in [-(2**32 - 1), 2**32 - 1]"
    )


def seed_int(text: str) -> int:
    """An argparse ``type``: a seed, an int in ``[-SEED_MAX, SEED_MAX]`` (see :func:`seed_error`)."""
    try:
        val = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int in [-(2**32 - 1), 2**32 - 1], got {text!r}") from None
    why = seed_error(val)
    if why:
        raise argparse.ArgumentTypeError(why)
    return val


seed_int.metavar = "INT"


def finite_number(*, positive: bool, hint: str = ""):
    """An argparse ``type``: a finite float > 0 (``positive``) or >= 0; NaN and inf are refused."""
    bound = "> 0" if positive else ">= 0"

    def parse(text: str) -> float:
        try:
            val = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number {bound}, got {text!r}{hint}") from None
        if not math.isfinite(val) or val < 0 or (positive and val == 0):
            raise argparse.ArgumentTypeError(f"must be a finite number {bound}, got {text!r}{hint}")
        return val

    parse.metavar = "FLOAT"
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def path_text(text: str) -> str:
    """An argparse ``type``: a path, not empty (an empty one was the current folder: a run's files landed beside the
    user's), with a leading ``~`` expanded (the shell expands none after ``--ckpt=``)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must be a path, not empty")
    return os.path.expanduser(text) if text.startswith("~") else text


path_text.metavar = "PATH"


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expects true/false, got {text!r}")


def _scalar(typ: type):
    def parse(text: str):
        try:
            return typ(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expects {typ.__name__}, got {text!r}") from None

    parse.metavar = typ.__name__.upper()
    return parse


def _int_tuple(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects comma-separated ints like 0,2 (or none), got {text!r}") from None
    if not values and text.strip():  # "," read as no ints: as an empty value (None where it is optional), silently
        raise argparse.ArgumentTypeError(f"expects comma-separated ints like 0,2 (or none), got {text!r}")
    if len(set(values)) < len(values):  # a typo (0,0 for 0,1) would pass as a shorter list
        raise argparse.ArgumentTypeError(f"lists {text!r} with a value twice; give each once, like 0,2")
    return values


_int_tuple.metavar = "INTS"


def _or_none(parse):
    """``parse``, and ``none`` / ``null`` / an empty value for None (an int tuple: an empty one too)."""

    def parse_optional(text: str):
        if text.strip().lower() in ("none", "null", ""):
            return None
        val = parse(text)
        return None if val == () else val

    parse_optional.metavar = getattr(parse, "metavar", "VALUE")
    return parse_optional


@functools.cache
def field_comments(cls: type) -> dict[str, str]:
    """``{field: the comment at the end of its line}`` from ``cls``'s source (empty without the source)."""
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments = {}
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        text = tok.string.lstrip("#").strip()
        if tok.type == tokenize.COMMENT and not text.startswith("fmt:"):
            comments[tok.start[0]] = text
    out = {}
    for node in ast.parse(src).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.end_lineno in comments:
            out[node.target.id] = comments[node.end_lineno]
    return out


def _show(value) -> str:
    """A default as it is typed on the command line."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    return repr(value) if value == "" else str(value)


def _option_fields(cls: type, base, flatten: Sequence[str], exclude: Sequence[str]):
    """``(field, owner class, type hint, default)`` per option of ``cls``: its own fields, and those of the nested
    dataclass fields named in ``flatten`` in their place. Fields of another type (dict, a nested dataclass not
    flattened) and those in ``exclude`` are not options."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        if f.name in flatten:
            nested_base = getattr(base, f.name) if base is not None else f.default_factory()
            yield from _option_fields(hints[f.name], nested_base, (), exclude)
            continue
        if base is not None:
            default = getattr(base, f.name)
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        yield f, cls, hints[f.name], default


def _argument(f: dataclasses.Field, owner: type, hint, default) -> dict | None:
    """The ``add_argument`` keywords of one field, or None for a type that is not an option."""
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)
    if optional:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    origin = typing.get_origin(hint) or hint
    kw: dict = {}
    if hint is bool:
        kw.update(nargs="?", const=True, type=_parse_bool, metavar="BOOL")
    elif origin is list:
        (item,) = typing.get_args(hint) or (str,)
        kw.update(nargs="+", type=_scalar(item))
    elif isinstance(origin, type) and issubclass(origin, Sequence) and origin is not str:
        kw.update(type=_int_tuple)
    elif hint in (int, float, str):
        kw.update(type=_scalar(hint))
    else:
        return None
    kw["type"] = f.metadata.get("type", kw["type"])
    kw.setdefault("metavar", getattr(kw["type"], "metavar", "VALUE"))
    if optional:
        kw["type"] = _or_none(kw["type"])
    text = f.metadata.get("help") or field_comments(owner).get(f.name, "")
    if default is dataclasses.MISSING:
        kw["required"] = True
        text += " (required)"
    elif default is not None:
        text += f" (default: {' '.join(map(str, default)) if origin is list else _show(default)})"
    kw["help"] = text.strip().replace("%", "%%")
    return kw


def add_options(
    parser: argparse.ArgumentParser, cls: type, base=None, *, flatten: Sequence[str] = (), exclude: Sequence[str] = ()
) -> list[str]:
    """Add an option per field of dataclass ``cls`` to ``parser`` (see the module docstring); the defaults shown
    are ``base``'s (default: the field defaults). Options not given are left out of the parsed namespace, so
    :func:`values_of` returns only what the command line set. Returns the option names."""
    names = []
    for f, owner, hint, default in _option_fields(cls, base, flatten, exclude):
        kw = _argument(f, owner, hint, default)
        if kw is None:
            continue
        parser.add_argument(f"--{f.name}", dest=f.name, default=argparse.SUPPRESS, **kw)
        if kw["type"] is _parse_bool and default is True:
            parser.add_argument(f"--no_{f.name}", dest=f.name, action="store_false", default=argparse.SUPPRESS,
                                help=f"same as --{f.name}=false")  # fmt: skip
        names.append(f.name)
    return names


def values_of(ns: argparse.Namespace, names: Sequence[str]) -> dict:
    """The options of ``names`` that the command line set."""
    return {k: v for k, v in vars(ns).items() if k in names}


def build(cls: type, values: dict, base=None, *, flatten: Sequence[str] = ()):
    """A ``cls`` from option values: ``base`` (or the defaults) with ``values`` replaced, nested ones included."""
    kw = {}
    for f in dataclasses.fields(cls):
        if f.name in flatten:
            nested = typing.get_type_hints(cls)[f.name]
            sub = {k: v for k, v in values.items() if k in {g.name for g in dataclasses.fields(nested)}}
            if sub:
                kw[f.name] = build(nested, sub, getattr(base, f.name) if base is not None else None)
        elif f.name in values:
            kw[f.name] = values[f.name]
    return dataclasses.replace(base, **kw) if base is not None else cls(**kw)


_OPTION_NAME = re.compile(r"--[A-Za-z][\w-]*")


def normalise_argv(argv: Sequence[str], known: Collection[str] | None = None) -> list[str]:
    """Option names with underscores (``--no-progress`` -> ``--no_progress``); a bare ``--`` dropped (no
    command takes positional arguments). Only a token whose part before any ``=`` is an option name is
    rewritten, and only that part: a value such as ``--prompt "-- a well-known text"`` is kept as given. With
    ``known`` (the option strings, underscored), only a name that becomes one of them: a value shaped like an
    option (``--prompt --well-known``) is kept as given too."""
    out = []
    for a in argv:
        if a == "--":
            continue
        key, eq, value = a.partition("=")
        if _OPTION_NAME.fullmatch(key):
            name = "--" + key[2:].replace("-", "_")
            if known is None or name in known:
                a = name + eq + value
        out.append(a)
    return out


def refuse_unknown(parser: argparse.ArgumentParser, unknown: Sequence[str]) -> None:
    if not unknown:
        return
    first = unknown[0]
    if not first.startswith("--"):
        parser.error(f"expected --key=value or --key value, got {first!r}")
    key = first.partition("=")[0]
    known = [s for a in parser._actions for s in a.option_strings if s.startswith("--")]
    close = difflib.get_close_matches(key, known, n=3)
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    parser.error(f"unknown option {key}{hint}; --help lists the options")


def parse_options(args: Sequence[str], cls: type, base=None, **kw) -> dict:
    """Parse ``args`` against the options of ``cls`` (see :func:`add_options`) -> the values given, by name;
    a bad command line is a :class:`UsageError` (a ValueError) with argparse's message."""
    parser = OptionParser(prog=cls.__name__, allow_abbrev=False, formatter_class=help_formatter)
    names = add_options(parser, cls, base, **kw)
    ns, unknown = parser.parse_known_args(normalise_argv(args, option_strings(parser)))
    refuse_unknown(parser, unknown)
    return values_of(ns, names)


def option_strings(*parsers: argparse.ArgumentParser) -> set[str]:
    """Every ``--name`` the parsers take (what :func:`normalise_argv` may rewrite a dashed name to)."""
    return {s for parser in parsers for a in parser._actions for s in a.option_strings if s.startswith("--")}
