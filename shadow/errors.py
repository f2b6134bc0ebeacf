"""The error types every module may raise; this module imports nothing of shadow's, so that any may import it."""


class ConfigError(ValueError):
    """A bad config value or input; its message is one line naming the key, the value and the fix."""
