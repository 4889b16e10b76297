"""protoken: protein structures <-> trRosetta 6D images <-> discrete tokens."""

__version__ = "0.1.0"
