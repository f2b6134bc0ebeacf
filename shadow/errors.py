"""The error types every module may raise, and the suggestion their messages share; this module imports nothing
of shadow's, so that any may import it."""

import difflib


class ConfigError(ValueError):
    """A bad config value or input; its message is one line naming the key, the value and the fix."""


def closest(word: str, known: list[str]) -> str | None:
    """The one of ``known`` a misspelt ``word`` most likely meant; None where none is close."""
    close = difflib.get_close_matches(word, known, n=1, cutoff=0.82)  # 0.8: opt-175b is not opt-13b
    return close[0] if close else None


def did_you_mean(word: str, known: list[str]) -> str:
    """" (did you mean x?)" after an error's subject, or "" where no option is close."""
    close = closest(word, known)
    return f" (did you mean {close}?)" if close else ""
