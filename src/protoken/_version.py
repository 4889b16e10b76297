"""The package version, in a module of its own so that any module can read it without importing
the package's public interface (protoken/__init__.py imports the tokenizer)."""

__version__ = "0.1.0"
