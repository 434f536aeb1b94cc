#!/usr/bin/env python
"""Write docs/configuration.md: every key of the config tree (finetune/conf/) with its type, default and meaning.

    python docs/make_config_reference.py            # rewrite docs/configuration.md
    python docs/make_config_reference.py --check    # exit 1 when the page differs from what the tree gives

Each key's meaning is the comment written beside it in its yaml file (the tree documents every key where it is
declared); its default is the value of the group's default option (``train.yaml``'s defaults list), and the values
other options set are listed beside it. Presets that set keys of other groups (``@package _global_``: ``method``,
``sweep``, ``experiment``) are listed with what they set. ``tests/unit/test_docs.py`` fails when the page is out of
date or names a key the tree no longer has.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "finetune" / "conf"
PAGE = ROOT / "docs" / "configuration.md"

# Groups whose options hold keys of their own (package = the group's path), in the order of the page.
GROUPS = ["model", "quantization", "lora", "qat_targets", "distill", "dataset", "trainer", "distributed", "logger",
          "hydra/launcher"]
PRESETS = ["method", "sweep", "experiment", "qkd_arm"]  # @package _global_: a set of overrides of other groups' keys

_KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w.-]*|\+[\w./@-]+): ?(?P<rest>.*)$")


@dataclass
class Key:
    path: str
    value: object
    comment: str = ""


@dataclass
class Option:
    name: str
    summary: str
    keys: dict[str, Key] = field(default_factory=dict)
    is_global: bool = False
    comments: dict[str, str] = field(default_factory=dict)  # every commented key, mappings included


def _split_comment(rest: str) -> tuple[str, str]:
    """``value  # comment`` -> (value, comment); a ``#`` inside quotes is part of the value."""
    quote = None
    for i, ch in enumerate(rest):
        if ch in "\"'" and quote in (None, ch):
            quote = None if quote == ch else ch
        elif ch == "#" and quote is None and (i == 0 or rest[i - 1].isspace()):
            return rest[:i].strip(), rest[i + 1:].strip()
    return rest.strip(), ""


def _comments(text: str) -> tuple[str, dict[str, str]]:
    """(the file's header comment, {dotted key: its comment}) read from the yaml's lines.

    A key's comment is the one on its line, continued by comment-only lines indented past the key; comment-only
    lines just above a key at its own indentation count for it where its own line has none.
    """
    header: list[str] = []
    found: dict[str, str] = {}
    stack: list[tuple[int, str]] = []  # (indent, key) of the open mappings
    pending: list[str] = []
    last: tuple[str, int] | None = None  # (dotted key, indent) of the last key line
    seen_key = False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            words = stripped.lstrip("#").strip()
            indent = len(line) - len(line.lstrip())
            if words.startswith("@package"):
                continue
            if not seen_key:
                header.append(words)
            elif last is not None and indent > last[1] and words:
                found[last[0]] = f"{found.get(last[0], '')} {words}".strip()
            else:
                pending.append(words)
            continue
        match = _KEY.match(line)
        if not match:
            if stripped:
                last = None  # a list item or a continued value: comments after it belong to no key
            pending = [] if stripped else pending
            continue
        seen_key = True
        indent, key = len(match["indent"]), match["key"]
        while stack and stack[-1][0] >= indent:
            stack.pop()
        dotted = ".".join([*(k for _, k in stack), key])
        value, comment = _split_comment(match["rest"])
        if not comment and pending:
            comment = " ".join(pending)
        pending = []
        if comment:
            found[dotted] = comment
        stack.append((indent, key))
        last = (dotted, indent)
    return " ".join(header), found


def _leaves(data, prefix: str = "") -> dict[str, object]:
    """{dotted key: value} of a mapping's leaves (an empty mapping is a leaf)."""
    out: dict[str, object] = {}
    for key, value in (data or {}).items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_leaves(value, path + "."))
        else:
            out[path] = value
    return out


def read_option(path: Path) -> Option:
    text = path.read_text(encoding="utf-8")
    header, comments = _comments(text)
    data = yaml.safe_load(text) or {}
    data.pop("defaults", None)
    is_global = "@package _global_" in text.splitlines()[0] if text else False
    keys = {k: Key(k, v, comments.get(k, "")) for k, v in _leaves(data).items()}
    return Option(path.stem, header, keys, is_global, comments)


def group_defaults() -> dict[str, str | None]:
    """The default option of each group, from train.yaml's defaults list (None where the group has none)."""
    defaults: dict[str, str | None] = {}
    for item in yaml.safe_load((CONF / "train.yaml").read_text(encoding="utf-8"))["defaults"]:
        if isinstance(item, dict):
            (group, value), = item.items()
            defaults[group.removeprefix("optional ")] = value if isinstance(value, str) else None
    return defaults


def type_name(value: object) -> str:
    if isinstance(value, str) and value.startswith("${"):
        return "interpolation"
    return {bool: "bool", int: "int", float: "float", str: "str", list: "list", dict: "mapping",
            type(None): "null"}.get(type(value), type(value).__name__)


def show(value: object) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000, allow_unicode=True).strip()
    text = text.removesuffix("\n...").removesuffix("...").strip()
    return "`" + text.replace("|", "\\|").replace("\n", " ") + "`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def types_of(keys: list[Key]) -> str:
    """The types a key takes over the options (``str or null`` where one option leaves it unset)."""
    names = list(dict.fromkeys(type_name(k.value) for k in keys))
    if "null" in names and len(names) > 1:
        names = [n for n in names if n != "null"] + ["null"]
    return " or ".join(names)


def meaning_of(path: str, keys: list[Key], comments: dict[str, str]) -> str:
    """The key's own comment (in any option), else its nearest commented parent's, e.g. ``(in random_init: ...)``."""
    own = next((k.comment for k in keys if k.comment), "")
    if own:
        return own
    parts = path.split(".")
    for end in range(len(parts) - 1, 0, -1):
        parent = ".".join(parts[:end])
        if comments.get(parent):
            return f"(in `{parts[end - 1]}`: {comments[parent]})"
    return ""


def key_table(prefix: str, options: list[Option], default: str | None,
              preset_values: dict[str, list[object]] | None = None) -> list[str]:
    """One row per key of a group: type and default (the default option's value), other options' values, meaning."""
    by_key: dict[str, dict[str, Key]] = {}
    comments: dict[str, str] = {}
    for option in options:
        comments.update({k: v for k, v in option.comments.items() if v and k not in comments})
        for path, key in option.keys.items():
            by_key.setdefault(path, {})[option.name] = key
    lines = ["| key | type | default | other options | meaning |", "|---|---|---|---|---|"]
    for path, per_option in by_key.items():
        base_name = default if default in per_option else next(iter(per_option))
        base = per_option[base_name]
        others = [f"{name}: {show(k.value)}" for name, k in per_option.items()
                  if name != base_name and k.value != base.value]
        meaning = meaning_of(path, [base, *per_option.values()], comments)
        shown_default = show(base.value) if base_name == default or default is None else f"{show(base.value)} ({base_name})"
        seen = [*per_option.values(), *(Key(path, v) for v in (preset_values or {}).get(prefix + path, []))]
        lines.append(f"| `{prefix}{path}` | {types_of(seen)} | {shown_default} | {'; '.join(others)} | "
                     f"{_cell(meaning)} |")
    return lines


def render() -> str:
    defaults = group_defaults()
    top = read_option(CONF / "train.yaml")
    preset_values: dict[str, list[object]] = {}  # what presets set a key to: its type where every option has null
    for group in PRESETS:
        for path in (CONF / group).glob("*.yaml"):
            for key, value in read_option(path).keys.items():
                preset_values.setdefault(key, []).append(value)
    out = ["# Configuration reference", "",
           "<!-- Generated by `python docs/make_config_reference.py` from finetune/conf/; do not edit by hand. -->", "",
           "Every key of the config tree, with its type, its default and what it means (the comment beside it in its",
           "yaml file). Set any key on the command line (`finetune-train lora.r=16`), pick a group's option by name",
           "(`finetune-train quantization=nf4`), and print the composed tree with `finetune-train --cfg job`. A key",
           "or option that does not exist is refused before anything runs, naming the nearest one.", "",
           "Groups: " + ", ".join(f"[`{g}`](#{g.replace('/', '')})" for g in [*GROUPS, *PRESETS]) + ".", "",
           "## Top level (`train.yaml`)", "", top.summary, "", *key_table("", [top], top.name, preset_values), ""]
    for group in GROUPS:
        folder = CONF / group
        options = [read_option(p) for p in sorted(folder.glob("*.yaml"))]
        default = defaults.get(group)
        prefix = group.replace("/", ".") + "."
        out += [f"## {group}", ""]
        out += [f"- `{group}={o.name}`{' (default)' if o.name == default else ''}: {_cell(o.summary)}" for o in options]
        if group == "qat_targets":
            out += ["", "Default: none. Several at once: `qat_targets=[attn,ffn]`."]
        out += ["", *key_table(prefix, options, default, preset_values), ""]
    for group in PRESETS:
        options = [read_option(p) for p in sorted((CONF / group).glob("*.yaml"))]
        how = "experiment=NAME" if group == "experiment" else f"+{group}=NAME"
        out += [f"## {group}", "", f"Presets (`{how}`): each sets the keys listed, over the groups' defaults.", ""]
        for option in options:
            out += [f"### `{group}={option.name}`", "", _cell(option.summary), ""]
            out += [f"- `{path}`: {show(key.value)}" + (f" — {key.comment}" if key.comment else "")
                    for path, key in option.keys.items()]
            out.append("")
    return "\n".join(out).rstrip() + "\n"


def all_keys() -> set[str]:
    """Every dotted key the page documents, as a run spells it (groups' keys under their package)."""
    keys = set(read_option(CONF / "train.yaml").keys)
    for group in GROUPS:
        for path in (CONF / group).glob("*.yaml"):
            keys |= {f"{group.replace('/', '.')}.{k}" for k in read_option(path).keys}
    return keys


def main(argv: list[str]) -> int:
    page = render()
    if argv[:1] == ["--check"]:
        current = PAGE.read_text(encoding="utf-8") if PAGE.exists() else ""
        if current != page:
            print(f"error: {PAGE.relative_to(ROOT)} is out of date; run: python docs/make_config_reference.py",
                  file=sys.stderr)
            return 1
        return 0
    if argv:
        print("usage: python docs/make_config_reference.py [--check]", file=sys.stderr)
        return 2
    PAGE.write_text(page, encoding="utf-8")
    print(f"wrote {PAGE.relative_to(ROOT)} ({len(page.splitlines())} lines, {len(all_keys())} keys)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
