"""The package version, in a module of its own so the commands can report it without importing the package's
public names."""

__version__ = "0.1.0"
