"""``sharegpt``: multi-turn conversations, a list of ``{from, value}`` turns per row (and an optional per-row
system prompt); ``dataset.role_map`` maps each ``from`` to a chat role, and a role it does not map is an error
naming it, never a dropped turn."""

from __future__ import annotations

from collections.abc import Mapping

from omegaconf import OmegaConf

from finetune import checks
from finetune.errors import FinetuneError
from finetune.formats.base import CHAT_ROLES, DatasetFormat, RowCheck, bad_row, register, show, to_container


def role_map(dcfg: Mapping) -> dict[str, str]:
    """The ``dataset.role_map`` as a plain dict (ShareGPT role -> chat-template role)."""
    return dict(to_container(dcfg.get("role_map")) or {})


@register
class ShareGPT(DatasetFormat):
    name = "sharegpt"
    task = "generation"

    def check_config(self, d: Mapping) -> None:
        checks.text("dataset.conversations_field", d.get("conversations_field"))
        checks.text("dataset.system_field", d.get("system_field"), optional=True)
        roles = d.get("role_map")
        if not OmegaConf.is_dict(roles) or not roles:
            raise FinetuneError(f"dataset.role_map={roles!r} must map ShareGPT roles to {', '.join(CHAT_ROLES)}")
        for name, role in roles.items():
            checks.choice(f"dataset.role_map.{name}", role, CHAT_ROLES)

    def row_check(self, dcfg: Mapping) -> RowCheck:
        conv_key, system_key, roles = dcfg.get("conversations_field", "conversations"), dcfg.get("system_field"), \
            role_map(dcfg)

        def check(row: dict, i: int, origin: str, require_label: bool) -> dict:
            conv = row.get(conv_key)
            if not isinstance(conv, list) or not conv:
                raise bad_row(origin, i, f"field {conv_key!r} (dataset.conversations_field) is {show(conv)}; "
                                         "expected a non-empty list of {from, value} turns")
            for j, turn in enumerate(conv):
                if not isinstance(turn, Mapping) or not isinstance(turn.get("from"), str) or \
                        not isinstance(turn.get("value"), str):
                    raise bad_row(origin, i, f"turn {j} is {show(turn)}; expected an object with string fields "
                                             "'from' and 'value'")
                if turn["from"] not in roles:
                    raise bad_row(origin, i, f"turn {j} has role {turn['from']!r}, which dataset.role_map does not "
                                             f"map (mapped: {', '.join(sorted(roles)) or 'none'}); add it, e.g. "
                                             f"+dataset.role_map.{turn['from']}=assistant")
            if not any(roles[t["from"]] == "assistant" for t in conv):
                raise bad_row(origin, i, "has no turn that dataset.role_map maps to 'assistant'; nothing to learn from")
            system = row.get(system_key) if system_key else None
            if system is not None and not isinstance(system, str):
                raise bad_row(origin, i, f"field {system_key!r} (dataset.system_field) is {show(system)}; "
                                         "expected a string")
            return row

        return check

    def messages(self, row: Mapping, dcfg: Mapping) -> list[dict]:
        roles, messages = role_map(dcfg), []
        system_field = dcfg.get("system_field")
        if system_field and isinstance(row.get(system_field), str) and row[system_field].strip():
            messages.append({"role": "system", "content": row[system_field]})
        for turn in row[dcfg.get("conversations_field", "conversations")]:
            if turn["from"] not in roles:
                raise FinetuneError(f"ShareGPT role {turn['from']!r} is not in dataset.role_map (mapped: "
                                    f"{', '.join(sorted(roles))}); add it")
            messages.append({"role": roles[turn["from"]], "content": turn["value"]})
        return messages
