"""Launcher presets compose (joblib for local parallel sweeps, submitit for SLURM); sweep preset too."""
from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from stun_exp.run import CONF_DIR


@pytest.mark.parametrize("launcher,target,key,value", [
    ("local_parallel", "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher", "n_jobs", 2),
    ("slurm", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher", "gpus_per_node", 1),
])
def test_launcher_presets_compose(launcher, target, key, value):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_ == target and cfg.hydra.launcher[key] == value


def test_sparsity_sweep_preset_turns_on_multirun():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["sweep=sparsity"], return_hydra_config=True)
    assert cfg.hydra.mode.name == "MULTIRUN" and cfg.hydra.sweeper.params.sparsity == "0.2,0.4,0.5,0.65"
