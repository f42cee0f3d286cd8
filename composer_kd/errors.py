"""The one exception type the CLI turns into a one-line message instead of a traceback."""

__all__ = ['ConfigError']


class ConfigError(ValueError):
    """A user error in a run config or command-line argument; the message names the key and the value."""
