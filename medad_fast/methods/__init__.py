"""Methods behind one interface (:class:`~medad_fast.methods.base.Method`) and their registry.

Every method is one module here; registering it (:func:`~medad_fast.methods.registry.register`)
is all it takes for the engine (train / evaluate / predict / resume / DDP) and the
registry-wide tests to serve it. The registry and the config readers that look a method up
by name live in :mod:`medad_fast.methods.registry`, which the method modules import; this
package imports the built-in methods (so that they are registered) and re-exports.
``medad-fast methods`` lists them.
"""

from __future__ import annotations

from .base import Method, image_scores, score_filter_size
from .registry import (DEFAULT_METHOD, config_from_dict, create_method, get_method, method_config, method_names,
                       register, resolve_config)

# the built-in methods register themselves on import
from . import frequency_aware, ae, draem, ddad, squid  # noqa: F401  (in this order: `methods` lists them so)

__all__ = ["DEFAULT_METHOD", "Method", "register", "get_method", "method_names", "method_config", "create_method",
           "resolve_config", "config_from_dict", "image_scores", "score_filter_size"]
