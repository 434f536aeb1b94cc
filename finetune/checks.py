"""Checks of one config value: each raises a one-line :class:`FinetuneError` naming the key, what it holds and
what is allowed. :mod:`finetune.config` and the dataset formats (:mod:`finetune.formats`) build on them."""

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
