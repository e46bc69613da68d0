"""Every method's own command-line options, as the method declares them.

A method's options are the fields of its config dataclass declared with
:func:`medad_fast.config.setting` (help, optional ``choices`` and ``shortcuts``); each belongs
to its method: two methods may both have ``image_score`` with different choices and help,
and neither sees the other's. This module turns the declarations into plain records
(:class:`MethodOption`) and parses a value given on the command line against the option of
one method (:meth:`MethodOption.parse`); the argument parsers of ``train`` and ``compare``
are built from them (in :mod:`medad_fast.cli`; no argument parser here).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .methods import get_method, method_names

__all__ = ["MethodOption", "Shortcut", "method_options", "option_owners", "option_name", "settings_for_methods"]


def option_name(setting: str) -> str:
    """``image_score`` -> ``--image-score``."""
    return "--" + setting.replace("_", "-")


@dataclass(frozen=True)
class Shortcut:
    """A switch that sets one value of a setting (``--recon-only``: ``mode = recon_only``)."""

    option: str
    value: Any
    help: str


@dataclass(frozen=True)
class MethodOption:
    """One setting of one method as a command-line option."""

    method: str
    setting: str
    help: str
    kind: type  # bool (a --x / --no-x switch), int, float or str
    choices: tuple[Any, ...] | None = None
    shortcuts: tuple[Shortcut, ...] = ()

    @property
    def option(self) -> str:
        return option_name(self.setting)

    @property
    def is_switch(self) -> bool:
        return self.kind is bool

    def parse(self, text: Any) -> Any:
        """The setting's value of ``text`` (a command-line string; a switch's or shortcut's
        value is already typed); ``ValueError`` naming the method (the caller names the
        option) for a value of the wrong type or outside the method's choices."""
        if self.is_switch or not isinstance(text, str):
            value = text
        else:
            try:
                value = self.kind(text)
            except ValueError:
                raise ValueError(f"invalid {self.kind.__name__} value {text!r} (method {self.method})") from None
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"invalid choice {text!r} for method {self.method} (choose from "
                             f"{', '.join(map(str, self.choices))})")
        return value


def _kind(f: dataclasses.Field) -> type:
    """The value type of a setting, from its default or (default None) its annotation."""
    if f.default is not None:
        return type(f.default)
    annotation = str(f.type)
    for kind in (bool, int, float):
        if kind.__name__ in annotation:
            return kind
    return str


def method_options(method: str) -> dict[str, MethodOption]:
    """The options of ``method`` (its settings that have help), by setting name, in the
    order of its config's fields; ``ValueError`` for an unknown method."""
    options = {}
    for f in dataclasses.fields(get_method(method).Config):
        if "help" not in f.metadata:
            continue
        shortcuts = tuple(Shortcut("--" + name, value, text)
                          for name, (value, text) in f.metadata.get("shortcuts", {}).items())
        options[f.name] = MethodOption(method, f.name, f.metadata["help"], _kind(f), f.metadata.get("choices"),
                                       shortcuts)
    return options


def option_owners(methods: list[str] | None = None) -> dict[str, dict[str, MethodOption]]:
    """Setting name -> {method: its option} over ``methods`` (default: every registered
    method), settings in order of first appearance."""
    owners: dict[str, dict[str, MethodOption]] = {}
    for method in methods if methods is not None else method_names():
        for name, option in method_options(method).items():
            owners.setdefault(name, {})[method] = option
    return owners


def settings_for_methods(methods: list[str], values: dict[str, Any]) -> tuple[dict[str, dict[str, Any]],
                                                                               dict[str, list[str]]]:
    """Share out method settings given once for several methods (``compare``): each method
    gets the settings it has, parsed against its own option. ``values``: setting -> value
    as given (a string, or a bool for a switch). Returns ``({method: {setting: value}},
    {setting: [the methods that have no such setting]})``. ``ValueError`` naming the option
    and the method when a method has the setting but not the value, and naming the option
    when no method of ``methods`` has it."""
    per_method: dict[str, dict[str, Any]] = {method: {} for method in methods}
    ignored: dict[str, list[str]] = {}
    owners = option_owners(methods)
    for setting, given in values.items():
        have = owners.get(setting, {})
        if not have:
            elsewhere = ", ".join(option_owners().get(setting, {})) or "no method"
            name = "--no-" + setting.replace("_", "-") if given is False else option_name(setting)
            raise ValueError(f"{name}: no method of {', '.join(methods)} has it (an option of {elsewhere})")
        for method, option in have.items():
            try:
                per_method[method][setting] = option.parse(given)
            except ValueError as exc:
                raise ValueError(f"{option.option}: {exc}") from None
        missing = [method for method in methods if method not in have]
        if missing:
            ignored[setting] = missing
    return per_method, ignored
