"""What a dataset format is: a name, the task it serves, the ``dataset.*`` keys it reads, a check of one row and
the chat messages a row becomes. Each format is one module beside this one (see :mod:`finetune.formats`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from finetune.errors import FinetuneError

TASKS = ("classification", "generation")
CHAT_ROLES = ("user", "assistant", "system")
# Checks one row: (row copy, 0-based index, origin for messages, require_label) -> the normalised row.
RowCheck = Callable[[dict, int, str, bool], dict]


class DatasetFormat:
    """One way dataset rows look. Subclass it in a module of :mod:`finetune.formats` and decorate it with
    :func:`register`; the module's ``dataset.format`` name is then accepted by the config validator, the data
    loaders and the prompt renderer.

    Attributes:
        name: the ``dataset.format`` value.
        task: ``classification`` (rows are scored by label words) or ``generation`` (loss on responses).
    """

    name: str = ""
    task: str = "generation"

    def check_config(self, d: Mapping) -> None:
        """Check the ``dataset.*`` keys this format reads (the shared ones are checked by the config validator).

        Raises:
            FinetuneError: naming the key, its value and what is allowed.
        """

    def row_check(self, dcfg: Mapping) -> RowCheck:
        """The check of one row under ``dcfg`` (config values resolved once here, not once per row).

        The returned function raises :class:`FinetuneError` naming the origin, the row index, the field and what
        is expected, and returns the row normalised (e.g. labels as ints).
        """
        raise NotImplementedError

    def messages(self, row: Mapping, dcfg: Mapping) -> list[dict]:
        """The chat messages ``[{"role", "content"}, ...]`` of one checked row (before ``dataset.system``)."""
        raise NotImplementedError


REGISTRY: dict[str, DatasetFormat] = {}


def register(cls: type[DatasetFormat]) -> type[DatasetFormat]:
    """Class decorator: make ``cls`` available as ``dataset.format=<cls.name>``."""
    if not cls.name or cls.task not in TASKS:
        raise TypeError(f"{cls.__name__}: a dataset format needs a name and a task in {TASKS}")
    if cls.name in REGISTRY and type(REGISTRY[cls.name]) is not cls:
        raise TypeError(f"dataset format {cls.name!r} is defined twice ({type(REGISTRY[cls.name]).__name__}, "
                        f"{cls.__name__})")
    REGISTRY[cls.name] = cls()
    return cls


# ---------------------------------------------------------------------------------------------------------
# Helpers the formats share


def to_container(value: Any) -> Any:
    """Turn an OmegaConf node into plain python (dict / list); leave anything else unchanged."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def coerce_label(value: Any, n_labels: int) -> int | None:
    """Return ``value`` as a label index in ``range(n_labels)``, or None when it is not one.

    Accepts ints and integer strings such as ``"1"`` (CSV cells); floats only when integral. Booleans are not
    labels: ``true`` in a file says nothing of which label word it means, so it is refused rather than guessed.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    elif isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value.strip())
    if isinstance(value, int) and 0 <= value < n_labels:
        return value
    return None


def show(value: Any) -> str:
    """Short description of a bad value for an error line (never dumps a whole review)."""
    if value is None:
        return "missing"
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"


def bad_row(origin: str, i: int, what: str) -> FinetuneError:
    return FinetuneError(f"{origin}: row {i} {what}")
