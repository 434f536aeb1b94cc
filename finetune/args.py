"""``key=value`` arguments of the commands that are not Hydra apps (finetune-eval, -chat, -merge, -export):
parsing against the allowed keys, and typed values whose errors name the key."""

from __future__ import annotations

from finetune.errors import FinetuneError


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
