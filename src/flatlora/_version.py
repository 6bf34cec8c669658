"""The package version, in a module of its own so that submodules read it without importing the package."""

__version__ = "0.1.0"  # the one source: pyproject.toml reads it (dynamic version)
