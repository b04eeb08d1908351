"""Errors the CLI turns into one clear line (no traceback)."""
from __future__ import annotations

import difflib
from typing import Iterable


class ConfigError(ValueError):
    """A bad configuration value, caught before any expensive work starts.

    The message always names the key, the value and what is allowed, plus the closest
    valid name when the value looks like a typo.
    """

    def __init__(self, key: str, value: object, allowed: str | Iterable[str], hint: str = "") -> None:
        self.key, self.value = key, value
        if isinstance(allowed, str):
            allowed_txt = allowed
        else:
            choices = [str(a) for a in allowed]
            allowed_txt = "one of " + ", ".join(choices)
            close = difflib.get_close_matches(str(value), choices, n=1)
            if close and close[0] != str(value):
                hint = hint or f"did you mean '{close[0]}'?"
        msg = f"{key}={value!r} is invalid: allowed {allowed_txt}"
        super().__init__(msg + (f" ({hint})" if hint else ""))


class DataError(RuntimeError):
    """Bad data met during a run (NaN/inf weights or activations, missing datasets)."""


def closest(name: str, choices: Iterable[str]) -> str:
    """Return ' (did you mean X?)' for a likely typo, else ''."""
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""
