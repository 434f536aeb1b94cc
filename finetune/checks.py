"""Checks of what a user typed, each raising a one-line :class:`FinetuneError` naming the key, what it holds and
what is allowed: one config value (:func:`choice`, :func:`number`, ...: :mod:`finetune.config` and the dataset formats
build on them), and the ``key=value`` arguments of the commands that are not Hydra apps (finetune-eval, -chat, -merge,
-export: :func:`parse_kv`, and the typed readings :func:`as_bool`, :func:`as_number`, :func:`as_choice`)."""


from __future__ import annotations

import string
from typing import Any

from omegaconf import OmegaConf

from finetune.errors import FinetuneError


def choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise FinetuneError(f"{key}={value!r} is not allowed; choose one of: {', '.join(map(str, allowed))}")


def number(key: str, value: Any, *, low=None, high=None, low_open=False, high_open=False, integer=False) -> None:
    """Check ``low (<|<=) value (<|<=) high``; booleans are not numbers."""
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise FinetuneError(f"{key}={value!r} must be {'an integer' if integer else 'a number'}")
    bad_low = low is not None and (value <= low if low_open else value < low)
    bad_high = high is not None and (value >= high if high_open else value > high)
    if bad_low or bad_high:
        lo = "" if low is None else f"{low} {'<' if low_open else '<='} "
        hi = "" if high is None else f" {'<' if high_open else '<='} {high}"
        raise FinetuneError(f"{key}={value!r} is out of range; allowed: {lo}{key}{hi}")


def boolean(key: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise FinetuneError(f"{key}={value!r} is not allowed; allowed: true, false")


def text(key: str, value: Any, *, optional: bool = False) -> None:
    """A non-empty string (or null when ``optional``)."""
    if optional and value is None:
        return
    if not isinstance(value, str) or not value.strip():
        allowed = "null or a non-empty string" if optional else "a non-empty string"
        raise FinetuneError(f"{key}={value!r} is not allowed; allowed: {allowed}")


def text_list(key: str, value: Any, *, optional: bool = False, allow_empty: bool = True) -> None:
    if optional and value is None:
        return
    if not OmegaConf.is_list(value) or not all(isinstance(v, str) and v.strip() for v in value) or (
            not allow_empty and not value):
        raise FinetuneError(f"{key}={value!r} is not allowed; allowed: a {'' if allow_empty else 'non-empty '}list "
                            "of strings")


def template(key: str, value: Any) -> None:
    """A prompt template: a string with ``{text}`` and at most ``{instruction}`` besides."""
    if not isinstance(value, str):
        raise FinetuneError(f"{key}={value!r} must be a string with {{text}} (and optionally {{instruction}})")
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(value) if name is not None}
    except ValueError as exc:
        raise FinetuneError(f"{key}={value!r} is not a valid template ({exc}); write literal braces as {{{{ }}}}") from None
    unknown = sorted(fields - {"text", "instruction"})
    if unknown or "text" not in fields:
        raise FinetuneError(f"{key}={value!r}: " + (f"unknown field(s) {', '.join('{' + f + '}' for f in unknown)}; "
                            if unknown else "") + "allowed: {text} (required) and {instruction}")


# ---------------------------------------------------------------------------------------------------------
# key=value arguments


def parse_kv(argv: list[str], allowed: dict[str, str | None], required: tuple[str, ...] = ("run",),
             usage: str = "", passthrough: tuple[str, ...] = ()) -> tuple[dict[str, str | None], list[str]]:
    """Parse ``key=value`` arguments against the allowed keys and their defaults.

    Args:
        argv: the command-line arguments (without the program name).
        allowed: every accepted key and its default (``None`` = unset).
        required: keys that must be given.
        usage: a hint appended to the missing-key message.
        passthrough: key prefixes (e.g. ``"dataset."``) whose arguments are config overrides, returned apart.

    Returns:
        ``allowed`` updated with the given values (strings), and the passthrough arguments in order.

    Raises:
        FinetuneError: an argument is not ``key=value``, a key is unknown or given twice, a required key is
            missing.
    """
    values, seen, overrides = dict(allowed), set(), []
    keys = ", ".join([*allowed, *(f"{p}*" for p in passthrough)])
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise FinetuneError(f"argument '{arg}' is not key=value; keys: {keys}")
        if key.startswith(passthrough) and passthrough:
            overrides.append(arg)
            continue
        if key not in allowed:
            raise FinetuneError(f"unknown key '{key}'; allowed: {keys}")
        if key in seen:
            raise FinetuneError(f"{key} is given twice")
        seen.add(key)
        values[key] = value
    for key in required:
        if not values.get(key):
            raise FinetuneError(f"missing {key}=<value>{usage}")
    return values, overrides


def as_bool(key: str, value: str | bool | None) -> bool:
    """``true/false/1/0/yes/no`` (case-insensitive) as a bool.

    Raises:
        FinetuneError: anything else, naming ``key``.
    """
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off", "none", ""):
        return False
    raise FinetuneError(f"{key}={value} is not a boolean; use true or false")


def as_number(key: str, value: str | None, kind: type = int, low: float | None = None,
              high: float | None = None, optional: bool = False):
    """``value`` as an ``int`` or ``float`` within ``[low, high]`` (``None`` allowed when ``optional``).

    Raises:
        FinetuneError: not a number of that kind or out of range, naming ``key``.
    """
    if optional and (value is None or str(value).lower() in ("", "null", "none")):
        return None
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise FinetuneError(f"{key}={value} is not {'an integer' if kind is int else 'a number'}") from None
    if (low is not None and number < low) or (high is not None and number > high):
        bounds = f"{low if low is not None else '-inf'}..{high if high is not None else 'inf'}"
        raise FinetuneError(f"{key}={value} is out of range ({bounds})")
    return number


def as_choice(key: str, value: str | None, choices: tuple[str, ...]) -> str:
    """``value`` when it is one of ``choices``.

    Raises:
        FinetuneError: naming ``key`` and the allowed values.
    """
    if value not in choices:
        raise FinetuneError(f"{key}={value} is not allowed; choose one of: {', '.join(choices)}")
    return value
