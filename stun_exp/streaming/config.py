"""``runtime`` config group: streaming mode and where its files go (schema ``schema_runtime``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from stun_exp.config.schema import schema
from stun_exp.errors import ConfigError


@schema("runtime", "runtime")
@dataclass
class RuntimeConfig:
    name: str = "default"
    streaming: bool = False               # prune layer by layer from the checkpoint's safetensors shards
    offload_activations: bool = False     # keep calibration activations between layers in files
    offload_dir: Optional[str] = None     # null: <run_dir>/activations (or a temp dir without a run dir)
    output_dir: Optional[str] = None      # pruned checkpoint; null: <run_dir>/checkpoint
    eval_max_windows: Optional[int] = None   # streaming perplexity: first N windows per dataset

    def validate(self, info: object = None, prefix: str = "runtime") -> None:
        if self.eval_max_windows is not None and self.eval_max_windows < 1:
            raise ConfigError(f"{prefix}.eval_max_windows", self.eval_max_windows, "an integer >= 1 or null")
        if self.offload_dir is not None and not self.offload_activations:
            raise ConfigError(f"{prefix}.offload_dir", self.offload_dir, "null unless offload_activations=true")
