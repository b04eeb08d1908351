"""Check a command line before Hydra runs anything: every job of a sweep is composed and validated.

``preflight(argv)`` turns every bad input into one line on stderr and exit code 2, before any job
starts: Hydra composition errors (unknown group option or key, wrong type — with the closest valid
name), then ``config.validate`` and ``config.inputs`` on each job of a multirun (``-m`` or a sweep
preset), so that job 7 of 12 cannot fail an hour in. Invocations with other Hydra flags (``--help``,
``--cfg``, ``--info``, ...) are left to Hydra.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any, Optional

from stun_exp.errors import ConfigError, DataError

MULTIRUN_FLAGS = ("-m", "--multirun")
MAX_JOBS_CHECKED = 2000


def preflight(argv: list[str], conf_dir: Path) -> Optional[dict]:
    """Exit 2 with one line when any job of this command line would be refused.

    Returns ``{"hydra_mode": ...}`` for a single run (the ``hydra.mode`` value of the config it
    composed, which is what Hydra's own mode probe would find), else None."""
    flags = [a for a in argv if a.startswith("-")]
    if any(f not in MULTIRUN_FLAGS for f in flags):
        return None
    overrides = [a for a in argv if not a.startswith("-")]
    found: dict = {}
    try:
        check_jobs(job_overrides(overrides, conf_dir, multirun=bool(flags), found=found), conf_dir)
    except (ConfigError, DataError) as e:
        fail(str(e))
    return found or None


def fail(message: str) -> None:
    print(f"stun-exp: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def _compose(overrides: list[str], conf_dir: Path, hydra_cfg: bool = False) -> Any:
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            return compose(config_name="config", overrides=overrides, return_hydra_config=hydra_cfg)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError._raw("", None, one_line(e, overrides, conf_dir)) from None


def job_overrides(overrides: list[str], conf_dir: Path, multirun: bool, found: Optional[dict] = None) -> list[Any]:
    """Every job this command line launches: its task overrides (multirun), or, for a single run,
    its composed config (composed once: it is also the one to check; its ``hydra.mode`` goes into
    ``found``)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import open_dict
    task = [o for o in overrides if not _is_hydra_key(o)]
    if not multirun and not any(_is_sweep(o) for o in overrides):
        full = _compose(overrides, conf_dir, hydra_cfg=True)
        if "MULTIRUN" not in str(full.hydra.mode):
            _check_folder("hydra.run.dir", full)
            if found is not None:
                found["hydra_mode"] = full.hydra.mode
            with open_dict(full):
                del full["hydra"]
            return [full]
    full = _compose([o for o in overrides if not _is_sweep(o)], conf_dir, hydra_cfg=True)
    _check_folder("hydra.sweep.dir", full)
    params = [f"{k}={v}" for k, v in (full.hydra.sweeper.get("params") or {}).items()]
    parsed = OverridesParser.create().parse_overrides(params + task)
    jobs = BasicSweeper.split_arguments(parsed, None)[0]
    return jobs[:MAX_JOBS_CHECKED]


def _check_folder(key: str, full: Any) -> None:
    """The run (or sweep) folder Hydra will create must be creatable."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from stun_exp.config.files import check_out_root
    check_out_root(str(full.out_root))              # the root the user set is named first
    try:
        path = OmegaConf.select(full, key)
    except OmegaConfBaseException:      # an interpolation only Hydra's runtime can resolve
        return
    if path:
        try:
            check_out_root(str(path))
        except ConfigError as e:
            raise ConfigError(key, str(path), "a folder that can be created and written",
                              hint=str(e).split("(", 1)[-1].rstrip(")")) from None


def _is_hydra_key(o: str) -> bool:
    key = o.split("=", 1)[0].lstrip("+~")
    return key.startswith(("hydra.", "hydra/"))


def _is_sweep(o: str) -> bool:
    if "=" not in o or _is_hydra_key(o):
        return False
    value = o.split("=", 1)[1]
    return bool(re.search(r",(?![^\[]*\])", value)) or value.startswith(("range(", "choice(", "interval("))


def check_job(overrides: list[str], conf_dir: Path) -> None:
    """Compose one job's config and run every check that comes before a model loads."""
    check_jobs([overrides], conf_dir)


def check_jobs(jobs: list[Any], conf_dir: Path) -> None:
    """``check_job`` on each job of a sweep in order (or ``check_config`` on a single run's composed
    config), composing the jobs together: once per distinct set of group choices (``config.compose``)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from stun_exp.config.compose import Composer
    if not any(isinstance(job, list) for job in jobs):     # a single run, composed already
        for cfg in jobs:
            check_config(cfg)
        return
    failed = None
    with Composer(conf_dir) as composer:
        for job in jobs:
            try:
                cfg = composer.compose(job)
            except (HydraException, OmegaConfBaseException) as e:
                failed = (job, e)
                break
            check_config(cfg)
    if failed is not None:    # worded outside the composer: the wording composes configs of its own
        raise ConfigError._raw("", None, one_line(failed[1], failed[0], conf_dir)) from None


def check_config(cfg: Any) -> None:
    from stun_exp.config.inputs import check_inputs
    from stun_exp.config.validate import validate
    info = validate(cfg)
    check_inputs(cfg, info)


# ---- one line from a Hydra / OmegaConf composition error ------------------------------------------
_TYPES = {"Float": "a number", "Integer": "an integer", "Boolean": "true or false", "String": "a string"}


def one_line(e: Exception, overrides: list[str], conf_dir: Path) -> str:
    """Hydra/OmegaConf composition errors reduced to one line (+ the closest valid option or key)."""
    msg = str(e)
    m = re.search(r"Could not find '([^/']+)/([^']+)'", msg)
    if m:
        group, value = m.groups()
        opts = sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))
        return str(ConfigError(group, value, opts))
    m = re.search(r"Could not override '([^']+)'", msg) or re.search(r"Key '([^']+)' (?:is )?not in", msg)
    if m:
        return _unknown_key(m.group(1), overrides, conf_dir)
    m = re.search(r"Error merging override (\S+?)=(.*)$", msg.splitlines()[0])
    if m:
        key, value = m.groups()
        cause = str(e.__cause__ or "")
        t = re.search(r"converted to (\w+)", cause)
        allowed = _TYPES.get(t.group(1), t.group(1)) if t else cause.splitlines()[0] if cause else "another value"
        return str(ConfigError(key, value, allowed))
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
    key = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("full_key:")), None)
    head = " ".join(ln for ln in lines if not ln.startswith(("full_key:", "object_type", "reference_type")))
    return f"{key}: {head}" if key else head


def _unknown_key(key: str, overrides: list[str], conf_dir: Path) -> str:
    """'<key>: no such key (did you mean ...)' using the keys the config really has at that level."""
    value = next((o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].lstrip("+~") == key), None)
    rest = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != key]
    parent, _, _leaf = key.rpartition(".")
    try:
        cfg = _compose(rest, conf_dir)
        node = cfg
        for part in filter(None, parent.split(".")):
            node = node[part]
        known = [f"{parent}.{k}" if parent else str(k) for k in node.keys()]
        where = f"{parent}={node.get('name', node.get('kind', parent))}" if parent else "the config"
    except Exception:  # noqa: BLE001 — the parent itself is unknown: compare with the root keys
        from stun_exp.config.core import ROOT_KEYS
        known, where = ROOT_KEYS, "the config"
    return str(ConfigError.unknown_key(key, value, known, where))
