"""The exception types the CLI turns into a one-line message instead of a traceback."""

__all__ = ['ConfigError', 'DataError', 'TrainingFault']


class ConfigError(ValueError):
    """A user error in a run config or command-line argument; the message names the key and the value."""


class DataError(ConfigError):
    """Bad training or eval data (a missing, truncated or corrupt shard, a sample too long or with ids outside
    the vocabulary); the message names the file or the sample."""


class TrainingFault(RuntimeError):
    """A run stopped by a fault it detected (a non-finite loss); the message names the step, rank and samples."""
