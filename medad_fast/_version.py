"""The package version, in a module of its own so that the modules the package's
``__init__`` imports (``_extension``) can read it without importing the package back."""

__version__ = "0.1.0"
