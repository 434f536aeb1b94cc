"""Dataset formats, one module each: a new format is one Python file here (a :class:`DatasetFormat` subclass
decorated with :func:`register`) plus a yaml in ``conf/dataset/``; a new dataset in a known format is the yaml
alone. Every module of this package is imported once, on first use, so the registry knows them all."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping

from finetune.errors import FinetuneError
from finetune.formats.base import (
    CHAT_ROLES, REGISTRY, TASKS, DatasetFormat, coerce_label, register, show, to_container,
)

__all__ = ["CHAT_ROLES", "TASKS", "DatasetFormat", "coerce_label", "discover", "get", "names", "of_config",
           "register", "show", "to_container"]

# The format of a config without dataset.format (runs recorded before the key existed), by dataset.name.
FORMAT_OF_NAME = {"chnsenticorp": "labelled_text", "alpaca": "alpaca", "sharegpt": "sharegpt"}


_discovered = False


def discover() -> None:
    """Import every module on this package's path (also folders a caller appended to ``__path__``)."""
    global _discovered
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")
    _discovered = True


def names() -> tuple[str, ...]:
    """The known ``dataset.format`` values, sorted (every module is imported on first use, also when one was
    imported directly before)."""
    if not _discovered:
        discover()
    return tuple(sorted(REGISTRY))


def get(name: str | None) -> DatasetFormat:
    """The format called ``name``.

    Raises:
        FinetuneError: no such format, naming the allowed ones.
    """
    if name not in names():
        raise FinetuneError(f"dataset.format={name!r} is not a known format; allowed: {', '.join(names())}")
    return REGISTRY[name]


def of_config(dcfg: Mapping) -> DatasetFormat:
    """The format of a ``dataset`` node: ``dataset.format``, or the one ``dataset.name`` implies for configs
    recorded before the key existed."""
    return get(dcfg.get("format") or FORMAT_OF_NAME.get(dcfg.get("name")))
