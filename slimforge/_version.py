"""The package version: a plain module, so that any module may import it without importing the package façade."""

__version__ = "0.1.0"
