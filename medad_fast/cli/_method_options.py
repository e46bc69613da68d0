"""The per-method options of ``train`` on the command line (argparse side of
:mod:`medad_fast.method_options`).

Each method's options are its own: ``--image-score`` of squid has squid's choices and help,
not ddad's. The parser registers every option name once, with its help hidden, and checks a
value against the option of the chosen method (``--method``, which may come before or after
it); ``--method M --help`` shows M's options.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from typing import Any

from ..method_options import method_options, option_owners
from ..methods import method_names

#: namespace attribute: setting -> (option string, value as given) of the method options given
_GIVEN = "_method_options_given"
#: namespace attribute: True once --method was given (the help then shows that method's options)
_METHOD_GIVEN = "_method_given"


def _method_option_error(namespace: argparse.Namespace, setting: str) -> str | None:
    """Set ``setting`` on ``namespace`` from its given value, checked against the option of
    the method chosen so far; else the error, naming the option and the method."""
    option_string, given, _ = getattr(namespace, _GIVEN)[setting]
    method = namespace.method
    option = method_options(method).get(setting)
    if option is None:
        owners = ", ".join(option_owners()[setting])
        return (f"argument {option_string}: method {method} has no option {option_string} (it is an option of "
                f"{owners}); `medad-fast train --method {method} --help` lists {method}'s options")
    try:
        setattr(namespace, setting, option.parse(given))
    except ValueError as exc:
        return f"argument {option_string}: {exc}"
    return None


def _check_method_option(parser: argparse.ArgumentParser, namespace: argparse.Namespace, setting: str) -> None:
    """:func:`_method_option_error` as an argparse error (exit 2); before ``--method`` was
    given the check waits for it (a later ``--method`` checks again, and
    :func:`check_method_options` checks against the default method)."""
    error = _method_option_error(namespace, setting)
    if error is not None and getattr(namespace, _METHOD_GIVEN, False):
        parser.error(error)


class _MethodOptionAction(argparse.Action):
    """A method option (``--x V``), switch (``--x/--no-x``) or shortcut (``--recon-only``):
    records what was given and checks it against the chosen method."""

    def __init__(self, option_strings: list[str], dest: str, kind: str = "value", shortcut_value: Any = None,
                 **kwargs: Any) -> None:
        self.kind, self.shortcut_value = kind, shortcut_value
        super().__init__(option_strings, dest, nargs=None if kind == "value" else 0, default=None,
                         help=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        value = {"value": values, "switch": not str(option_string).startswith("--no-"),
                 "shortcut": self.shortcut_value}[self.kind]
        given = getattr(namespace, _GIVEN, None)
        if given is None:
            given = {}
            setattr(namespace, _GIVEN, given)
        previous = given.get(self.dest)
        if previous is not None and previous[0] != option_string and "shortcut" in (self.kind, previous[2]):
            parser.error(f"argument {option_string}: not allowed with argument {previous[0]}")
        given[self.dest] = (option_string, value, self.kind)
        _check_method_option(parser, namespace, self.dest)


class MethodAction(argparse.Action):
    """``--method``: stores the method and checks the method options given before it."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, values)
        setattr(namespace, _METHOD_GIVEN, True)
        for setting in getattr(namespace, _GIVEN, {}):
            _check_method_option(parser, namespace, setting)


class MethodHelpAction(argparse.Action):
    """``-h/--help``: the generic options, then those of ``--method`` when it came before,
    else how to list a method's options."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        text = parser.format_help()
        if getattr(namespace, _METHOD_GIVEN, False):
            text += method_options_help(namespace.method, parser.prog, parser.formatter_class)
        else:
            hint = (f"each method has its own options (choices and help its own): `{parser.prog} --method M "
                    f"--help` lists method M's; methods: {', '.join(method_names())}")
            text += "\nmethod options:\n" + textwrap.fill(hint, 78, initial_indent="  ", subsequent_indent="  ") + "\n"
        sys.stdout.write(text)
        parser.exit()


def add_method_option_group(parser: argparse.ArgumentParser, method: str) -> argparse._ArgumentGroup:
    """``method``'s options in a group titled with it, as ordinary argparse options (types,
    choices, help: the method's): what ``--method M --help`` shows."""
    group = parser.add_argument_group(f"{method} options (default: the preset's)")
    for option in method_options(method).values():
        target = group.add_mutually_exclusive_group() if option.shortcuts else group
        if option.is_switch:
            target.add_argument(option.option, action=argparse.BooleanOptionalAction, default=None, help=option.help)
        else:
            target.add_argument(option.option, type=option.kind, choices=option.choices, default=None,
                                help=option.help)
        for shortcut in option.shortcuts:
            target.add_argument(shortcut.option, action="store_const", const=shortcut.value, dest=option.setting,
                                help=shortcut.help)
    return group


def method_options_help(method: str, prog: str, formatter_class: type = argparse.HelpFormatter) -> str:
    """The help section of ``method``'s options (no usage line)."""
    section = argparse.ArgumentParser(prog=prog, usage=argparse.SUPPRESS, add_help=False,
                                      formatter_class=formatter_class)
    add_method_option_group(section, method)
    return "\n" + section.format_help()


def add_method_option_arguments(parser: argparse.ArgumentParser) -> None:
    """Every method option name once (help hidden; checked per method by the actions)."""
    for setting, owners in option_owners().items():
        option = next(iter(owners.values()))
        if any(o.is_switch != option.is_switch for o in owners.values()):
            raise TypeError(f"setting {setting} is a switch in some methods and not in others: {sorted(owners)}")
        strings = [option.option, "--no-" + option.option[2:]] if option.is_switch else [option.option]
        parser.add_argument(*strings, dest=setting, action=_MethodOptionAction,
                            kind="switch" if option.is_switch else "value")
        shortcuts = {s.option: s for o in owners.values() for s in o.shortcuts}
        for shortcut in shortcuts.values():
            parser.add_argument(shortcut.option, dest=setting, action=_MethodOptionAction, kind="shortcut",
                                shortcut_value=shortcut.value)


def method_setting_values(args: argparse.Namespace) -> dict[str, Any]:
    """The method settings of a parsed ``train`` command line (checked against the method
    by the parser; None: not given)."""
    return {name: getattr(args, name, None) for name in option_owners()}


def check_method_options(args: argparse.Namespace) -> None:
    """Check the method options of a parsed command line against its ``--method`` (the
    default method's when none was given; the parser checked those given with ``--method``);
    ``ValueError`` naming the option and the method."""
    for setting in getattr(args, _GIVEN, {}):
        error = _method_option_error(args, setting)
        if error is not None:
            raise ValueError(error)
