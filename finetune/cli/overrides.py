"""finetune-train's command line checked before Hydra runs: one line, exit status 2, nothing written.

Hydra reports an unknown group option or a misspelt key with a generic multi-line text and status 1, and
for a typo suggests ``+key=value``, which would silently add a key that nothing reads. Here every override
is composed first, exactly as Hydra will compose it: an unknown option names its group and the options; an
unknown key names the nearest valid key; every value of every sweep (command line and preset) is validated;
a single run pointed at a directory that holds a run is refused before Hydra touches it.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from finetune.errors import FinetuneError

# Hydra flags that take a value, flags without one, and flags after which there is nothing to compose.
_FLAGS_WITH_VALUE = ("--cfg", "-c", "--package", "-p")
_FLAGS = ("-m", "--multirun", "--resolve")
_NO_RUN = ("-h", "--help", "--hydra-help", "--info", "-i", "--shell-completion", "-sc", "--config-path", "-cp",
           "--config-name", "-cn", "--config-dir", "-cd", "--experimental-rerun", "--version")
# Mappings whose keys are the user's to choose (``+dataset.role_map.function_call=assistant``).
FREE_MAPPINGS = ("dataset.role_map", "model.random_init")
# Names people bring from TrainingArguments / PEFT, and the key they mean here.
ALIASES = {
    "learning_rate": "lr", "num_train_epochs": "epochs", "num_epochs": "epochs",
    "per_device_train_batch_size": "batch_size", "train_batch_size": "batch_size",
    "per_device_eval_batch_size": "eval_batch_size", "gradient_accumulation_steps": "grad_accum",
    "lr_scheduler_type": "scheduler", "warmup": "warmup_ratio", "max_seq_length": "max_length",
    "max_seq_len": "max_length", "rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
    "gradient_checkpoint": "gradient_checkpointing", "bf16": "precision", "fp16": "precision",
}


def split_argv(argv: list[str]) -> tuple[list[str], bool, bool]:
    """(overrides, multirun?, anything to compose?) from finetune-train's arguments."""
    overrides, multirun, i = [], False, 0
    while i < len(argv):
        arg = argv[i]
        if arg in _NO_RUN or arg.split("=", 1)[0] in _NO_RUN:
            return [], False, False
        if arg in _FLAGS_WITH_VALUE:
            i += 2
            continue
        if arg in ("-m", "--multirun"):
            multirun = True
        elif not arg.startswith("-"):
            overrides.append(arg)
        i += 1
    return overrides, multirun, True


def group_options(conf_dir: Path) -> dict[str, list[str]]:
    """Every config group of conf/ and its options (file stems)."""
    return {d.name: sorted(p.stem for p in d.glob("*.yaml")) for d in sorted(conf_dir.iterdir())
            if d.is_dir() and d.name != "hydra"}


def leaf_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    keys = []
    for key in cfg.keys():
        if not prefix and key == "hydra":
            continue
        path = f"{prefix}{key}"
        node = cfg._get_node(key)
        keys.append(path)
        if OmegaConf.is_dict(node):
            keys += leaf_keys(node, path + ".")
    return keys


def nearest_key(key: str, known: list[str]) -> str | None:
    """The valid key a misspelt ``key`` most likely means: a known alias in the same node, else the closest
    spelling (``trainer.learning_rate`` -> ``trainer.lr``, ``lora.alhpa`` -> ``lora.alpha``)."""
    parent, _, leaf = key.rpartition(".")
    alias = ALIASES.get(leaf)
    if alias:
        candidate = f"{parent}.{alias}" if parent else alias
        if candidate in known:
            return candidate
    siblings = [k for k in known if k.rpartition(".")[0] == parent]
    match = difflib.get_close_matches(key, siblings, n=1, cutoff=0.6) or difflib.get_close_matches(
        key, known, n=1, cutoff=0.6)
    return match[0] if match else None


def _unknown_key(key: str, known: list[str], added: bool = False) -> FinetuneError:
    near = nearest_key(key, known)
    parent = key.rpartition(".")[0]
    siblings = sorted(k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == parent)
    hint = f"did you mean {near}?" if near else (f"keys under {parent}: {', '.join(siblings)}" if parent and siblings
                                                  else "see finetune-train --cfg job")
    what = "is not a config key (+ would add a key that nothing reads)" if added else "is not a config key"
    return FinetuneError(f"{key} {what}; {hint}")


def precheck(argv: list[str], conf_dir: str | Path, config_name: str = "train") -> None:
    """Compose and validate finetune-train's overrides as Hydra will, before Hydra runs.

    Raises:
        FinetuneError: the first problem, in one line naming the key or option, the value and what is allowed.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    overrides, multirun, composing = split_argv(argv)
    if not composing:
        return
    conf_dir = Path(conf_dir)
    parser = OverridesParser.create()
    parsed = []
    for line in overrides:
        try:
            parsed += parser.parse_overrides([line])
        except HydraException as exc:
            raise FinetuneError(f"cannot parse {line!r}: {_first_line(exc)}; write key=value "
                                "(quote values with special characters)") from None

    groups = group_options(conf_dir)
    plain, sweeps = [], []
    for o in parsed:
        key = o.key_or_group
        if o.is_sweep_override():
            if not multirun:
                raise FinetuneError(f"{o.input_line} sweeps over several values; add -m (--multirun) to run one job "
                                    "per value")
            sweeps.append(o)
            continue
        plain.append(o)
        if key in groups and not o.is_delete():
            _check_options(key, o.value(), groups[key])

    with initialize_config_dir(str(conf_dir.resolve()), version_base="1.3"):
        first = [o.input_line for o in plain] + [v for v in map(_first_value, sweeps) if v]
        cfg = _compose(compose, config_name, first, parsed, groups)
        adds = [o for o in plain if (o.is_add() or o.is_force_add()) and "." in o.key_or_group
                and not o.key_or_group.startswith("hydra")]
        if adds:
            rest = [line for line in first if line not in {o.input_line for o in adds}]
            _check_added_keys(leaf_keys(_compose(compose, config_name, rest, parsed, groups)), adds)
        # Sweep values from the command line and from a preset's hydra.sweeper.params: each validated.
        preset = OmegaConf.to_container(cfg.hydra.sweeper, resolve=False).get("params") if multirun or \
            cfg.hydra.mode == "MULTIRUN" else None
        for line in [f"{k}={v}" for k, v in (preset or {}).items()]:
            (o,) = parser.parse_overrides([line])
            if o.is_sweep_override():
                sweeps.append(o)
        variants = []
        for o in sweeps:
            values = list(o.sweep_string_iterator()) if o.is_discrete_sweep() else []
            if o.key_or_group in groups:
                for v in values:
                    _check_options(o.key_or_group, _parse_value(parser, o.key_or_group, v), groups[o.key_or_group])
            variants += [f"{o.get_key_element()}={v}" for v in values]
        from finetune.config import validate

        validate(cfg)
        for variant in variants:
            validate(_compose(compose, config_name, first + [variant], parsed, groups))
        if not (multirun or cfg.hydra.mode == "MULTIRUN"):
            _check_run_dir(cfg)


def _compose(compose, config_name: str, overrides: list[str], parsed, groups) -> DictConfig:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        return compose(config_name, overrides=overrides, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as exc:
        raise _explain(exc, compose, config_name, parsed, groups) from None


def _explain(exc: Exception, compose, config_name: str, parsed, groups) -> FinetuneError:
    """Turn a composition error into one line: find the override that broke it."""
    known = None
    for o in parsed:
        key = o.key_or_group
        if key in groups or key.startswith("hydra") or o.is_add() or o.is_force_add() or o.is_delete():
            continue
        if known is None:
            try:
                base = compose(config_name, overrides=[p.input_line for p in parsed
                                                       if p.key_or_group in groups and not p.is_sweep_override()],
                               return_hydra_config=False)
                known = leaf_keys(base)
            except Exception:  # noqa: BLE001 - fall back to the library's own message
                break
        if key not in known:
            return _unknown_key(key, known)
    return FinetuneError(_first_line(exc))


def _check_added_keys(known: list[str], adds) -> None:
    """``+a.b=v`` / ``++a.b=v`` may only add keys that something reads: under a free mapping (``++`` may also
    set a declared key)."""
    for o in adds:
        key = o.key_or_group
        if any(key.startswith(m + ".") for m in FREE_MAPPINGS) or (o.is_force_add() and key in known):
            continue
        raise _unknown_key(key, known, added=True)


def _check_options(group: str, value, options: list[str]) -> None:
    values = value if isinstance(value, list) else [value]
    for v in values:
        if v is None:
            continue
        if str(v) not in options:
            raise FinetuneError(f"{group}={v} is not an option of the {group} group; choose one of: "
                                f"{', '.join(options)}")


def _parse_value(parser, key: str, text: str):
    (o,) = parser.parse_overrides([f"{key}={text}"])
    return o.value()


def _first_value(o) -> str | None:
    """``key=<first value>`` of a discrete sweep; None for an interval (the key keeps its configured value)."""
    values = list(o.sweep_string_iterator()) if o.is_discrete_sweep() else []
    return f"{o.get_key_element()}={values[0]}" if values else None


def _check_run_dir(cfg: DictConfig) -> None:
    from finetune.runs import check_run_dir
    from finetune.training.checkpoints import requeued_resume

    raw = OmegaConf.to_container(cfg.hydra.run, resolve=False).get("dir")
    if not isinstance(raw, str) or "${" in raw:
        return
    requeued_resume(cfg)  # a requeued SLURM job continues its run (as run() will decide)
    check_run_dir(Path(raw), resume=cfg.trainer.get("resume_from_checkpoint") is not None,
                  overwrite=bool(cfg.get("overwrite_run", False)))


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
