"""The docs cannot go stale: every ``finetune-*`` command in README.md and docs/ passes the checks the command
itself makes before any work (a renamed key fails here, not for a user), every relative link and image exists,
the configuration reference is the one finetune/conf/ gives, and the README stays a landing page."""

from __future__ import annotations

import importlib
import importlib.util
import re
import shlex
import sys
import tomllib
from pathlib import Path

import pytest

from finetune.errors import FinetuneError
from tests.conftest import CONF, ROOT, compose_cfg

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SHELL_BLOCKS = {"", "bash", "sh", "shell", "console"}
FENCE = re.compile(r"^(\s*)```\s*([\w-]*)\s*$")
PLACEHOLDER = re.compile(r"<[^<>\s]+>|\$\{?\w+\}?")  # <run dir>-style words and $VARS stand for a user's value
COMMANDS = {script: target.split(":")[0] for script, target in
            tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"].items()}


def shell_lines(text: str) -> list[tuple[int, str]]:
    """(line number, command) of every line in the shell code blocks of a Markdown text, continuations joined."""
    out, lang, buffer, start = [], None, "", 0
    for number, line in enumerate(text.splitlines(), 1):
        fence = FENCE.match(line)
        if fence:
            lang = fence[2].lower() if lang is None else None
            continue
        if lang not in SHELL_BLOCKS:
            continue
        if not buffer:
            start = number
        buffer += line.strip()
        if buffer.endswith("\\"):
            buffer = buffer[:-1] + " "
            continue
        out.append((start, buffer))
        buffer = ""
    return out


def command_of(line: str) -> tuple[str, list[str]] | None:
    """(command, its arguments) where a shell line runs one of the project's commands, else None.

    Understands ``$ `` prompts, ``./run``, ``VAR=value`` prefixes, wrappers (``/usr/bin/time -v``, ``torchrun ...``,
    ``accelerate launch ...``) and ``python -m finetune.cli.<module>``; a ``# comment`` ends the line.
    """
    line = PLACEHOLDER.sub("x", line.strip().removeprefix("$ "))
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        return None
    modules = {module: script for script, module in COMMANDS.items()}
    for i, word in enumerate(words):
        if word in COMMANDS:
            return word, [w for w in words[i + 1:] if w != "..."]
        if word == "-m" and i + 1 < len(words) and words[i + 1] in modules:
            return modules[words[i + 1]], [w for w in words[i + 2:] if w != "..."]
        if word in ("|", "&&", ";"):
            return None
    return None


def documented_commands() -> list[tuple[str, str, list[str]]]:
    found = []
    for page in PAGES:
        for number, line in shell_lines(page.read_text(encoding="utf-8")):
            command = command_of(line)
            if command:
                found.append((f"{page.relative_to(ROOT)}:{number}", *command))
    return found


# Imported once, before any test patches torch.cuda (bitsandbytes reads it at import).
MODULES = {command: importlib.import_module(module) for command, module in COMMANDS.items()}


def check_command(command: str, argv: list[str]) -> None:
    """What the command checks before it does any work (:func:`check_args` of its module)."""
    MODULES[command].check_args(argv)


def as_on_a_gpu_machine(monkeypatch) -> None:
    """The docs show GPU commands too (distributed=fsdp, deepspeed_*): they are checked as on a CUDA machine with
    DeepSpeed installed (and Triton, which PyTorch's CUDA builds bring); what a machine lacks is that machine's check,
    tested where it is made."""
    import importlib.machinery

    import torch

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: importlib.machinery.ModuleSpec(name, None)
                        if name in ("deepspeed", "triton") else find_spec(name, *a))


def test_every_command_module_checks_its_arguments_before_any_work():
    assert len(COMMANDS) >= 8
    missing = [c for c, module in MODULES.items() if not callable(getattr(module, "check_args", None))]
    assert missing == []


def test_the_docs_show_each_command():
    shown = {command for _, command, _ in documented_commands()}
    assert set(COMMANDS) - shown == set()


@pytest.mark.parametrize("where, command, argv", documented_commands(), ids=lambda v: v if isinstance(v, str) and
                         ":" in v else "")
def test_a_documented_command_passes_its_own_checks(where, command, argv, monkeypatch):
    monkeypatch.chdir(ROOT)  # relative paths in the docs are written from the project's root
    as_on_a_gpu_machine(monkeypatch)
    try:
        check_command(command, argv)
    except FinetuneError as exc:
        pytest.fail(f"{where}: {command} {' '.join(argv)}\n  -> error: {exc}")


@pytest.mark.parametrize("command, argv, message", [
    ("finetune-train", ["lora.rank=8"], "lora.rank is not a config key"),
    ("finetune-train", ["quantization=nf5"], "quantization=nf5 is not an option"),
    ("finetune-train", ["-m", "+sweep=lora_vs_qlorra"], "sweep=lora_vs_qlorra is not an option"),
    ("finetune-eval", ["run=x", "splits=test"], "unknown key 'splits'"),
    ("finetune-export", ["run=x", "format=int8"], "out"),
    ("finetune-report", ["x", "--kind", "nonsense"], "--kind"),
    ("finetune-bench", ["--arms", "finetune", "lora.rr=2"], "lora.rr is not a config key"),
])
def test_the_check_fails_on_a_stale_command(command, argv, message, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(FinetuneError, match=re.escape(message)):
        check_command(command, argv)


def test_commands_are_found_in_shell_blocks_only():
    text = "\n".join(["```bash", "$ ./run finetune-train lora.r=16 \\", "    quantization=nf4   # QLoRA", "```",
                      "```text", "finetune-train done", "```", "```",
                      "torchrun --nproc_per_node=2 -m finetune.cli.train distributed=ddp", "```"])
    found = [command_of(line) for _, line in shell_lines(text)]
    assert found == [("finetune-train", ["lora.r=16", "quantization=nf4"]),
                     ("finetune-train", ["distributed=ddp"])]
    assert command_of("finetune-chat run=outputs/<date>/<time> prompt='hi'") == (
        "finetune-chat", ["run=outputs/x/x", "prompt=hi"])


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def broken_links(page: Path) -> list[str]:
    """The relative links and images of a Markdown page whose file does not exist."""
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)  # code is not a link
    bad = []
    for target in LINK.findall(text):
        path = target.split("#", 1)[0]
        if not path or re.match(r"^[a-z][a-z0-9+.-]*:", path):  # an anchor on the page, or a URL
            continue
        if not (page.parent / path).exists():
            bad.append(target)
    return bad


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_image_exists(page):
    assert broken_links(page) == []


def test_a_broken_link_is_found(tmp_path):
    page = tmp_path / "p.md"
    (tmp_path / "there.md").write_text("x")
    page.write_text("[a](there.md) [b](gone.md#x) ![c](fig/none.png) [d](https://x.org/y) [e](#top)\n"
                    "```\n[f](inside-code.md)\n```\n")
    assert broken_links(page) == ["gone.md#x", "fig/none.png"]


def _reference():
    spec = importlib.util.spec_from_file_location("make_config_reference", ROOT / "docs" / "make_config_reference.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_configuration_reference_is_what_the_config_tree_gives():
    reference = _reference()
    assert reference.PAGE.read_text(encoding="utf-8") == reference.render(), \
        "docs/configuration.md is out of date: run python docs/make_config_reference.py"


def _leaves(node, prefix: str = "") -> set[str]:
    out: set[str] = set()
    for key, value in node.items():
        out |= _leaves(value, f"{prefix}{key}.") if isinstance(value, dict) and value else {f"{prefix}{key}"}
    return out


def _composed_keys() -> set[str]:
    """Every leaf key of the composed config, over every option of every group the page documents."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    reference = _reference()
    tree = lambda cfg, key: OmegaConf.to_container(OmegaConf.select(cfg, key), resolve=False)  # noqa: E731
    keys = {k for k in _leaves(tree(compose_cfg(), "")) if k.split(".")[0] not in
            {g.split("/")[0] for g in reference.GROUPS}}  # train.yaml's own keys
    with initialize_config_dir(str(CONF), version_base="1.3"):
        for group in reference.GROUPS:
            package = group.replace("/", ".")
            for option in sorted((CONF / group).glob("*.yaml")):
                cfg = compose("train", overrides=[f"{group}={option.stem}"], return_hydra_config=True)
                found = _leaves(tree(cfg, package), package + ".")
                if group == "hydra/launcher":  # the plugin's own keys are the plugin's to document
                    found = {k for k in found if k.split(".")[2] in OmegaConf.load(option)}
                keys |= found
    return keys


def test_the_configuration_reference_names_every_key_and_no_other():
    page = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^\| `([^`]+)` \|", page, flags=re.M))
    composed = _composed_keys()
    assert sorted(composed - documented) == []  # a key in conf/ the page does not name
    assert sorted(documented - composed) == []  # a key the page names that no longer exists


def test_the_readme_is_a_landing_page():
    readme = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(readme) <= 250
    assert any("docs/configuration.md" in line for line in readme)
