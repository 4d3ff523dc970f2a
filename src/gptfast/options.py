"""Options declared once: everything about a configuration field sits on the field itself.

``option(...)`` is a ``dataclasses.field`` whose metadata (an :class:`Option`) holds the field's
default, help, command-line group and flag, choices, checks and resume policy; its type is the
field's annotation. From the declarations, :func:`add_arguments` builds a command's arguments
(each value read and range-checked as the command line is parsed), :func:`check_fields` normalises
and validates an instance, :func:`markdown_table` writes the README's table, and
:mod:`gptfast.resume` settles a resumed run, checking the checkpoint's values the same way.
:func:`problem_with` is the one test of a value wherever it comes from.

A field whose policy is :attr:`Resume.FIXED` or :attr:`Resume.CHANGEABLE` is None in the
constructor's signature and on the command line, so "left out" means the same to both (a field not
passed, a flag not typed): :func:`given_options` records the options given, then
:func:`fill_defaults` sets the others to their declared defaults, which a resumed run replaces with
the checkpoint's values.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import enum
import functools
import math
import numbers
import os
import types
import typing
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

METADATA_KEY = "gptfast_option"


class Resume(enum.Enum):
    """What ``--resume`` does with an option: each member's value is how the README's table says it."""

    FIXED = "fixed"  # what the run computes: left out, the checkpoint's; given, it must agree with it
    CHANGEABLE = "may change"  # left out, the checkpoint's; given, it replaces the checkpoint's
    RUN = "this run only"  # how this process runs: never taken from the checkpoint


@dataclass(frozen=True)
class Option:
    """One field's declaration; see :func:`option`. ``name`` and ``type`` come from the field."""

    default: Any
    help: str
    group: str
    resume: Resume
    flag: str | None
    metavar: str | None
    choices: Sequence[str] | None
    check: Callable[[Any], str | None] | None
    parse: Callable[[str], Any] | None
    default_help: str | None
    cli_default: Any
    name: str = ""
    type: type = str
    is_list: bool = False

    @property
    def unset(self) -> Any:
        """The constructor's and command line's value for "not given": None when a resumed run takes it
        from the checkpoint (construction then sets the default), else the default."""
        return self.default if self.resume is Resume.RUN else None

    @property
    def positional(self) -> bool:
        return self.flag is not None and not self.flag.startswith("-")

    @property
    def spelling(self) -> str:
        """The command line's name for it: ``--max-steps``, ``--nondeterministic``, ``DATA``."""
        return self.flag or "--" + self.name.replace("_", "-")

    @property
    def default_text(self) -> str | None:
        """The default as help and the README say it; None when there is nothing to say."""
        if self.default_help is not None:
            return self.default_help
        if self.default is None or isinstance(self.default, (bool, list)):
            return None
        return str(self.default)

    @property
    def help_text(self) -> str:
        default = self.default_text
        return self.help if default is None else f"{self.help} (default: {default})"


def option(default: Any = None, *, help: str, group: str, resume: Resume = Resume.RUN, flag: str | None = None,
           metavar: str | None = None, choices: Sequence[str] | None = None,
           check: Callable[[Any], str | None] | None = None, parse: Callable[[str], Any] | None = None,
           default_help: str | None = None, cli_default: Any = None) -> Any:
    """A dataclass field declaring an option.

    ``default`` is the value when the option is left out (and, for FIXED and CHANGEABLE options, no
    checkpoint gives one); ``help`` says what it does, ``default_help`` how to say the default when
    ``str(default)`` would not. ``flag`` overrides ``--name-with-dashes`` (a bool whose default is
    True gets a flag that turns it off; a name without dashes is positional). ``check`` returns what
    is wrong with a value ("must be positive") or None; ``parse`` turns a string into the value (and
    raises ValueError saying what is wrong), on the command line and for a string given in Python.
    ``cli_default`` replaces the command line's default (e.g. ``argparse.SUPPRESS``).
    """
    declaration = Option(default, help, group, resume, flag, metavar, tuple(choices) if choices else None, check,
                         parse, default_help, cli_default)
    return dataclasses.field(default=declaration.unset, metadata={METADATA_KEY: declaration})


@functools.cache
def declarations(cls: type) -> dict[str, Option]:
    """The options of a dataclass, by field name in field order, with their names and types filled in."""
    hints = typing.get_type_hints(cls)
    found = {}
    for field in dataclasses.fields(cls):
        if METADATA_KEY in field.metadata:
            kind = _without_none(hints[field.name])
            is_list = typing.get_origin(kind) is list
            found[field.name] = dataclasses.replace(field.metadata[METADATA_KEY], name=field.name, is_list=is_list,
                                                    type=typing.get_args(kind)[0] if is_list else kind)
    return found


def _without_none(hint: Any) -> Any:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        (kind,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        return kind
    return hint


def check_fields(config: Any, named: Callable[[str], str] = str) -> None:
    """Normalise (:func:`normalised`) and validate (:func:`problem_with`) every option of ``config``
    in place; a ValueError names the first problem (``named`` spells the option as Python or the
    command line does)."""
    for name, declared in declarations(type(config)).items():
        try:
            value = normalised(declared, getattr(config, name))
        except ValueError as error:
            raise ValueError(f"{named(name)} {error}") from None
        if value is not None and declared.choices is not None and value not in declared.choices:
            raise ValueError(f"unknown {name} {value!r}: choose one of {', '.join(declared.choices)}")
        problem = None if value is None else problem_with(declared, value)
        if problem:
            raise ValueError(f"{named(name)} {problem}, got {value!r}")
        setattr(config, name, value)


def normalised(declared: Option, value: Any) -> Any:
    """``value`` as the option holds it: a string or path for a list a one-item list, another
    sequence a list of its own, a path a string, a string read by ``parse`` (whose ValueError says
    what is wrong), a whole number an integer. Anything else as it is, for :func:`problem_with`."""
    if declared.parse is not None and isinstance(value, str):
        return declared.parse(value)
    if declared.is_list and isinstance(value, (str, os.PathLike)):
        return [os.fspath(value)]
    if declared.is_list and isinstance(value, Iterable) and not isinstance(value, (bytes, dict)):
        return [os.fspath(item) if isinstance(item, os.PathLike) else item for item in value]  # a list of its own
    if declared.type is str and isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return value
    if declared.type is int and (isinstance(value, numbers.Integral) or float(value).is_integer()):
        return int(value)  # numpy's integers, 1e6
    return float(value) if declared.type is float and not isinstance(value, (int, float)) else value


TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def problem_with(declared: Option, value: Any) -> str | None:
    """What is wrong with ``value`` (not None) as the option's value, or None: its type, its choices,
    a float not finite, its declared ``check``. The one test of a value, whether it comes from the
    command line, Python or a checkpoint."""
    if declared.is_list:
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            return "must be a list of strings"
    elif not isinstance(value, (int, float) if declared.type is float else declared.type) or (
            isinstance(value, bool) and declared.type is not bool):
        return f"must be {TYPE_NAMES[declared.type]}"
    if declared.choices is not None and value not in declared.choices:
        return f"must be one of {', '.join(declared.choices)}"
    return _range_problem(declared, value)


def _range_problem(declared: Option, value: Any) -> str | None:
    if declared.type is float and not math.isfinite(value):
        return "must be a finite number"
    return None if declared.check is None else declared.check(value)


def given_options(config: Any, carried: Collection[str] | None) -> frozenset[str]:
    """The options of ``config`` that a checkpoint could give (FIXED, CHANGEABLE) and that were given a
    value (not None), before :func:`fill_defaults`. At construction (``carried`` None) that is every
    one passed; in a copy (``dataclasses.replace`` passes every field, and as ``carried`` the names
    its original was given), those its original was given and those changed from their defaults."""
    return frozenset(name for name, declared in declarations(type(config)).items()
                     if declared.resume is not Resume.RUN and getattr(config, name) is not None
                     and (carried is None or name in carried or getattr(config, name) != declared.default))


def fill_defaults(config: Any, skip: Collection[str] = ()) -> None:
    """Set each option of ``config`` left out (None), but those ``skip`` names, to its declared default."""
    for name, declared in declarations(type(config)).items():
        if getattr(config, name) is None and name not in skip:
            setattr(config, name, copy.copy(declared.default))  # a list of its own


def add_arguments(parser: argparse._ActionsContainer, cls: type, names: Sequence[str] | None = None) -> None:
    """Add the options of ``cls`` (or those ``names``) to ``parser``, in argument groups named by
    their ``group`` (in order of first appearance), unless ``names`` picks some: then to ``parser``
    itself, which may be a group (a mutually exclusive one, say)."""
    groups: dict[str, Any] = {}
    for declared in declarations(cls).values():
        if names is not None and declared.name not in names:
            continue
        if names is None and declared.group not in groups:
            groups[declared.group] = parser.add_argument_group(declared.group)
        target = parser if names is not None else groups[declared.group]
        default = declared.unset if declared.cli_default is None else declared.cli_default
        kwargs: dict[str, Any] = {"help": declared.help_text.replace("%", "%%"), "default": default}
        if declared.type is bool:
            target.add_argument(declared.spelling, dest=declared.name, **kwargs,
                                action="store_false" if declared.default else "store_true")
            continue
        kwargs.update(type=argparse_type(declared), choices=declared.choices)
        if declared.positional:
            target.add_argument(declared.name, nargs="*" if declared.is_list else None, metavar=declared.flag,
                                **kwargs)
        else:
            target.add_argument(declared.spelling, dest=declared.name, action="append" if declared.is_list else None,
                                metavar=declared.metavar, **kwargs)


def read(declared: Option, text: str) -> Any:
    """A command-line string as the option's value: ``parse``'s, or of its type (an integer may be
    written as a whole float, 1e6); a ValueError says what it must be."""
    if declared.parse is not None:
        return declared.parse(text)
    if declared.type is int:
        try:
            return int(text)
        except ValueError:
            number = _float(text, "an integer")
            if not number.is_integer():
                raise ValueError(f"must be an integer, got {text!r}") from None
            return int(number)
    return _float(text, "a number") if declared.type is float else text


def _float(text: str, kind: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"must be {kind}, got {text!r}") from None


def argparse_type(declared: Option) -> Callable[[str], Any]:
    """argparse's ``type=`` for an option: :func:`read`, then its range (a float's finiteness, its
    ``check``), each problem the one-line usage error naming the option (argparse checks choices)."""

    def parsed(text: str) -> Any:
        try:
            value = read(declared, text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        problem = _range_problem(declared, value)
        if problem:
            raise argparse.ArgumentTypeError(f"{problem}, got {text}")
        return value

    return parsed


def positive_int(text: str) -> int:
    """argparse's ``type=`` for a count of at least 1 (a bad number is the one-line usage error, not
    argparse's "invalid positive_int value")."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def from_arguments(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The fields of ``cls`` that ``args`` holds, as keyword arguments; an empty list is None (not given)."""
    return {name: getattr(args, name) or None if declared.is_list else getattr(args, name)
            for name, declared in declarations(cls).items() if hasattr(args, name)}


def markdown_table(cls: type) -> str:
    """The options of ``cls`` as a Markdown table: flag, Python field, default, resume policy, meaning."""
    rows = ["| Option | Python | Default | On `--resume` | Meaning |", "| --- | --- | --- | --- | --- |"]
    for declared in declarations(cls).values():
        default = declared.default_text
        python = f"{declared.name}={not declared.default}" if declared.type is bool else declared.name
        cells = [f"`{declared.spelling}`", f"`{python}`", "" if default is None else default,
                 declared.resume.value, declared.help]
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(rows) + "\n"
