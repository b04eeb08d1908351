"""Entry point: ``stun-exp`` (= ``python -m stun_exp.run``) -> ``run(cfg) -> dict``.

Stages, in this fixed order (docs/architecture.md): validate -> model -> calib -> expert pruner ->
unstructured pruner -> distill -> analyse -> evaluate -> record. Every stage is a config group;
``none`` skips a pruner, distillation or evaluation.
"""
from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path
from typing import Any, Iterator

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from stun_exp.config.schema import register_all
from stun_exp.errors import ConfigError, DataError

register_all()
log = logging.getLogger("stun_exp")


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run one experiment; returns the results dict that is also written to results.json.

    Validation runs first and imports nothing heavy, so a bad value costs about a second; files,
    datasets and sizes are checked next (``config.inputs``), still before any model loads."""
    from stun_exp.config.inputs import check_inputs
    from stun_exp.config.validate import validate
    info = validate(cfg)
    check_inputs(cfg, info)
    from stun_exp import pipeline  # heavy imports (torch, transformers) only once the config is valid
    return pipeline.run_pipeline(cfg, _run_dir(), info)


def _run_dir() -> str | None:
    try:
        return HydraConfig.get().runtime.output_dir
    except ValueError:  # run() called outside Hydra (tests, notebooks)
        return None


def _is_multirun() -> bool:
    try:
        return HydraConfig.get().mode.name == "MULTIRUN"
    except ValueError:
        return False


# An absolute path: Hydra resolves a relative one against the *module* (pkg://stun_exp/../conf) when
# the app starts from the `stun-exp` console script, and that module does not exist.
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _hydra_entry(cfg: DictConfig) -> Any:
    try:
        return run(cfg)["summary"]
    except (ConfigError, DataError) as e:
        # One clear line, no traceback. In a multirun the other jobs go on (the failure is recorded).
        print(f"stun-exp: error: {e}", file=sys.stderr, flush=True)
        if _is_multirun():
            from stun_exp.tracking.sweep import record_failure
            record_failure(_run_dir(), e)
            return None
        sys.exit(2)
    except Exception as e:  # noqa: BLE001
        if _is_multirun():
            from stun_exp.tracking.sweep import record_failure
            log.exception("job failed")
            record_failure(_run_dir(), e)
            return None
        raise


def main() -> None:
    from stun_exp.config.preflight import preflight
    found = preflight(sys.argv[1:], CONF_DIR)
    if found is None:
        _hydra_entry()
        return
    with _mode_known(found["hydra_mode"]):
        _hydra_entry()


@contextlib.contextmanager
def _mode_known(mode: Any) -> Iterator[None]:
    """Hydra composes a command's whole config once only to read ``hydra.mode`` (its ``get_mode``),
    then composes it again to run: 0.3 s of a small run. The preflight has just composed this
    single run and read that value, so Hydra is handed it instead of probing (hydra-core 1.3)."""
    from hydra._internal.hydra import Hydra
    probe = Hydra.get_mode
    Hydra.get_mode = lambda self, config_name, overrides: mode
    try:
        yield
    finally:
        Hydra.get_mode = probe


def cli() -> None:
    """The ``stun-exp`` command: ``main()``, then an exit without the interpreter's teardown.

    Unloading the module graph of torch and transformers takes about 2 s on a small CPU, longer than
    the pruning stage of many small runs. By then every output is written and closed (atomic writes);
    the exit handlers (W&B, logging) still run, and the streams are flushed, before the process ends.
    """
    try:
        main()
        code = 0
    except SystemExit as e:
        if not isinstance(e.code, (int, type(None))):
            raise
        code = e.code or 0
    _exit_now(code)


def _exit_now(code: int) -> None:
    import atexit
    import os
    import threading
    # what a normal exit runs before tearing modules down: join non-daemon threads and run the
    # threading exit hooks (executors of parallel launchers), then the atexit handlers (W&B, logging)
    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is not None:
        shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


if __name__ == "__main__":
    cli()
