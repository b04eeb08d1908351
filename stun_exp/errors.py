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

    @classmethod
    def unknown_key(cls, key: str, value: object, known: Iterable[str], where: str = "the config") -> "ConfigError":
        """A key no schema knows (a typo, or an added ``+key=``), with the closest real key."""
        known = list(known)
        leaf, leaves = key.rsplit(".", 1)[-1], {k.rsplit(".", 1)[-1]: k for k in known}
        close = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.6)
        hint = f"did you mean '{leaves[close[0]]}'?" if close else f"known keys: {', '.join(known)}"
        return cls._raw(key, value, f"{key}={value!r}: {where} has no key {leaf!r} ({hint})")

    @classmethod
    def missing(cls, key: str, where: str = "") -> "ConfigError":
        """A mandatory value (``???`` in the YAML) left empty."""
        return cls._raw(key, None, f"{key} is required{where} and has no default: set {key}=<value>")

    @classmethod
    def _raw(cls, key: str, value: object, message: str) -> "ConfigError":
        err = cls.__new__(cls)
        err.key, err.value = key, value
        ValueError.__init__(err, message)
        return err


class DataError(RuntimeError):
    """Bad data met during a run (NaN/inf weights or activations, missing datasets)."""


def closest(name: str, choices: Iterable[str]) -> str:
    """Return ' (did you mean X?)' for a likely typo, else ''."""
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""
