"""Weights & Biases, never in the way: offline automatically without credentials, never blocking a run."""

from __future__ import annotations

import contextlib
import io
import logging
import netrc
import os
import warnings
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("finetune.report.tracking")


def wandb_credentials(wandb: Any = None) -> bool:
    """True when an API key is configured (env or ~/.netrc; with the imported ``wandb`` module given, also its own
    settings lookup, without prompting), i.e. an online run could authenticate."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        rc = netrc.netrc(os.environ.get("NETRC") or Path.home() / ".netrc")
        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://", 1)[-1].split("/")[0]
        if rc.authenticators(host) is not None:
            return True
    except (OSError, netrc.NetrcParseError):
        pass
    if wandb is None:
        return False
    try:
        # wandb.api is deprecated and says so on stderr: keep that out of the command's output.
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            return bool(wandb.api.api_key)
    except Exception:  # noqa: BLE001 - any failure means "no usable credentials"
        return False


def wandb_mode(lcfg: DictConfig) -> str:
    """``logger.mode`` resolved: auto -> online with credentials, offline without; WANDB_MODE wins if set."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if lcfg.mode != "auto":
        return lcfg.mode
    return "online" if wandb_credentials() else "offline"


PROBE_TIMEOUT_S = 5.0   # an online run first checks that the server answers at all, within this
INIT_TIMEOUT_S = 10.0   # then gives wandb.init this long before falling back to offline


def server_url() -> str:
    return os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")


def server_reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether ``url`` answers an HTTP request (any status) within ``timeout`` seconds, DNS included.

    Run in a daemon thread joined with the timeout, so neither a slow name lookup nor a server that accepts
    the connection and never answers can hold the run longer.
    """
    import threading
    import urllib.error
    import urllib.request

    answered = threading.Event()

    def probe() -> None:
        try:
            urllib.request.urlopen(url, timeout=timeout).close()
            answered.set()
        except urllib.error.HTTPError:  # an HTTP error status is still an answer
            answered.set()
        except Exception:  # noqa: BLE001 - unreachable, refused, timed out, bad URL
            pass

    thread = threading.Thread(target=probe, name="wandb-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return answered.is_set()


def init_run(cfg: DictConfig, run_dir: Path, name: str, tags: list[str]):
    """Start a W&B run carrying the resolved config; returns None (and logs why) when W&B is off or fails.

    An online run whose server does not answer within 5 s starts offline at once, with one line saying so
    and how to sync it later; an online start that still stalls falls back to offline after 10 s. A run
    never fails or waits long because of W&B.
    """
    lcfg = cfg.logger
    if lcfg.backend != "wandb":
        return None
    mode = wandb_mode(lcfg)
    if mode == "disabled":
        return None
    try:
        import wandb
    except ImportError:
        log.warning("logger=wandb but wandb is not installed; continuing without it (pip install wandb)")
        return None
    os.environ.setdefault("WANDB_SILENT", "true")
    config = OmegaConf.to_container(cfg, resolve=True)
    kwargs = dict(
        project=lcfg.project,
        entity=lcfg.get("entity"),
        group=lcfg.get("group"),
        name=name,
        tags=[str(t)[:64] for t in list(lcfg.get("tags") or []) + tags],
        config=config,
        dir=str(run_dir),
        reinit="finish_previous",
    )
    if mode == "online" and not server_reachable(server_url()):
        log.warning("W&B server %s did not answer within %.0f s: logging offline to %s; sync later with: wandb sync "
                    "%s", server_url(), PROBE_TIMEOUT_S, run_dir / "wandb", run_dir / "wandb" / "offline-run-*")
        mode = "offline"
    for attempt in (mode, "offline") if mode == "online" else (mode,):
        try:
            run = wandb.init(mode=attempt, settings=wandb.Settings(init_timeout=INIT_TIMEOUT_S, console="off"),
                             **kwargs)
            log.info("W&B run %s (%s) in %s", run.name, attempt, run_dir / "wandb")
            return run
        except Exception as exc:  # noqa: BLE001 - any W&B failure must not stop training
            log.warning("W&B %s start failed (%s)", attempt, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    return None


def finish_run(run, summary: dict) -> None:
    """Write the final metrics into the run summary and close it; failures are logged, never raised."""
    if run is None:
        return
    try:
        for key, value in summary.items():
            if isinstance(value, (int, float, str, bool)) or value is None:
                run.summary[key] = value
        run.finish()
    except Exception as exc:  # noqa: BLE001
        log.warning("W&B finish failed: %s", exc)
