"""The package version, at the bottom of the import graph so every layer can report it."""

__version__ = "0.1.0"
