"""protoken: protein structures <-> trRosetta 6D images <-> discrete tokens."""

from protoken._version import __version__

__all__ = ["Tokenizer", "__version__"]


def __getattr__(name: str):
    # imported lazily: `import protoken` (and `protoken convert`) must not pay for torch
    if name == "Tokenizer":
        from protoken.tokenizer import Tokenizer

        return Tokenizer
    raise AttributeError(f"module 'protoken' has no attribute {name!r}")
