"""Methods behind one interface (:class:`~medad_fast.methods.base.Method`) and their registry.

Every method is one module here; registering it (:func:`register`) is all it takes for the
engine (train / evaluate / predict / resume / DDP) and the registry-wide tests to serve it.
``medad-fast methods`` lists them.
"""

from __future__ import annotations

import torch

from ..config import Config
from .base import Method, image_scores, score_filter_size

__all__ = ["DEFAULT_METHOD", "Method", "register", "get_method", "method_names", "create_method", "image_scores",
           "score_filter_size"]

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


def create_method(config: Config) -> Method:
    """A fresh method for ``config`` with its weights initialised from ``config.run.seed``
    (torch's global generator is seeded here, so the same seed gives the same weights)."""
    torch.manual_seed(config.run.seed)
    return get_method(config.run.method)(config)


def add_arguments(parser) -> None:
    """``medad-fast methods`` takes no arguments."""


def main(args=None) -> int:
    """``medad-fast methods``: one line per method."""
    width = max(len(name) for name in _REGISTRY)
    for name, cls in _REGISTRY.items():
        print(f"{name:<{width}}  {cls.summary}  (presets: {', '.join(cls.presets)})")
    return 0


# the built-in methods register themselves on import
from . import frequency_aware, ae, draem, ddad, squid  # noqa: E402,F401
