"""The method registry: a method's name -> its class, and the config readers that need it.

Every method module registers its class here (:func:`register`) when it is imported; the
package :mod:`medad_fast.methods` imports the built-in ones, and since Python runs a
package's ``__init__`` before any of its modules, importing anything from here (or from the
package) finds them all registered.

:func:`resolve_config` and :func:`config_from_dict` are the readers of
:mod:`medad_fast.config` with the method looked up by name: the config module cannot look it
up itself, because every method imports it.
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import Config, MethodConfig, config_from_preset
from .base import Method

__all__ = ["DEFAULT_METHOD", "register", "method_names", "get_method", "method_config", "create_method",
           "resolve_config", "config_from_dict"]

_REGISTRY: dict[str, type[Method]] = {}
#: what `medad-fast train` trains without --method: the paper's method
DEFAULT_METHOD = "frequency_aware"


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"method name {cls.name!r} is empty or already registered")
    missing = [p for p in ("paper", "small", "tiny") if p not in cls.presets]
    if missing:
        raise ValueError(f"method {cls.name!r} lacks the presets {missing}")
    _REGISTRY[cls.name] = cls
    return cls


def method_names() -> list[str]:
    """Registered method names, in registration order."""
    return list(_REGISTRY)


def get_method(name: str) -> type[Method]:
    """The method class registered as ``name`` (``ValueError`` listing the known ones)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {method_names()}") from None


def method_config(name: str) -> type[MethodConfig]:
    """The settings' dataclass of the method registered as ``name`` (``ValueError`` as
    :func:`get_method`)."""
    return get_method(name).Config


def create_method(config: Config) -> Method:
    """A fresh method for ``config`` with its weights initialised from ``config.run.seed``
    (torch's global generator is seeded here, so the same seed gives the same weights)."""
    torch.manual_seed(config.run.seed)
    return get_method(config.run.method)(config)


def resolve_config(method: str = DEFAULT_METHOD, preset: str = "paper", **overrides: Any) -> Config:
    """The config of ``method`` at ``preset`` with ``overrides`` (fields of either part;
    None values are ignored). ``ValueError`` names an unknown method, preset or field."""
    method_cls = get_method(method)
    return config_from_preset(method, preset, method_cls.presets, method_cls.Config, overrides)


def config_from_dict(values: dict[str, Any]) -> Config:
    """:meth:`Config.from_dict <medad_fast.config.Config.from_dict>` with the method's
    settings looked up in the registry: a saved ``config.json`` / checkpoint config back to
    a :class:`~medad_fast.config.Config` (``ValueError`` naming an unknown method or key)."""
    return Config.from_dict(values, method_config)
