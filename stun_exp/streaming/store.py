"""The model skeleton on the meta device, with one decoder layer materialised at a time.

``LayerStore(checkpoint_dir)`` builds the model class (per-layer-pruned subclass when the config
says so, as ``loading.load_pretrained``) under ``accelerate.init_empty_weights(include_buffers=False)``:
parameters cost nothing, buffers such as rotary ``inv_freq`` (not in checkpoints) stay real. The
globals (embeddings, final norm, head) are loaded at once; decoder layer l is loaded by
``materialise(l)`` from the memory-mapped shards into a fresh copy of the pristine meta layer (so a
layer shrunk by an expert plan in an earlier pass can be re-read), has its expert plan (if any)
applied exactly as ``surgery.apply_plan`` does in memory, and returns to the meta device on
``release(l)``. ``live`` / ``peak_live`` count materialised layers: the memory bound is asserted on it.
"""
from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..models.adapter import get_adapter
from ..models.loading import model_class
from ..models.plan import ExpertPlan
from .checkpoint import CheckpointReader, check_keys, detect_format, to_native


def build_skeleton(path: str | Path, trust_remote_code: bool = False) -> nn.Module:
    """The model of the checkpoint at `path` with every parameter on the meta device (eval mode)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=trust_remote_code)
    cls = model_class(config, str(path), trust_remote_code)
    with init_empty_weights(include_buffers=False):
        model = cls(config)
    return model.eval()


class LayerStore:
    """Skeleton + checkpoint: materialise / release decoder layers one at a time."""

    def __init__(self, path: str | Path, dtype: Optional[torch.dtype] = None, trust_remote_code: bool = False,
                 globals_device: str | torch.device = "cpu") -> None:
        from .memory import bound_allocator
        bound_allocator()
        self.path = Path(path)
        self.model = build_skeleton(self.path, trust_remote_code)
        self.adapter = get_adapter(self.model)
        self.reader = CheckpointReader(self.path, self.adapter.spec.layers_path)
        self.ckpt_dtype = self.reader.dtype()
        self.dtype = dtype or self.ckpt_dtype
        self.arch = self.adapter.spec.name
        self.pristine = [self._copy(layer) for layer in self.adapter.layers]
        self.plan: Optional[ExpertPlan] = None
        self.live: set[int] = set()
        self.peak_live = 0
        self.materialised = 0            # total materialise calls (layer reads)
        self.formats: dict[int, str] = {}
        self._load_globals(torch.device(globals_device))

    def _copy(self, layer: nn.Module) -> nn.Module:
        """Deep copy that keeps sharing the model's config (experts dispatch reads it at call time)."""
        cfg = self.model.config
        return copy.deepcopy(layer, memo={id(cfg): cfg})

    # ---- globals -------------------------------------------------------------------------------
    def _load_globals(self, device: torch.device) -> None:
        sd = {k: _cast(v, self.dtype).to(device) for k, v in self.reader.globals().items()}
        missing, unexpected = self.model.load_state_dict(sd, strict=False, assign=True)
        layer_pre = self.adapter.spec.layers_path + "."
        missing = [k for k in missing if not k.startswith(layer_pre)]
        if unexpected:
            raise ValueError(f"{self.path}: unexpected non-layer keys {unexpected[:6]}")
        if hasattr(self.model, "tie_weights"):
            self.model.tie_weights()
        still = [n for n, p in self.model.named_parameters() if p.is_meta and not n.startswith(layer_pre)]
        if still:
            raise ValueError(f"{self.path}: non-layer parameters missing from the checkpoint: {still[:6]}")

    def global_state(self) -> dict[str, torch.Tensor]:
        """The checkpoint's own non-layer tensors (written unchanged to the pruned checkpoint)."""
        return self.reader.globals()

    # ---- layers --------------------------------------------------------------------------------
    def layer_format(self, l: int) -> str:
        if l not in self.formats:
            self.formats[l] = detect_format(self.reader.layer_keys.get(l, {}), self.arch,
                                            self.adapter.spec.experts_attr)
        return self.formats[l]

    @torch.no_grad()
    def materialise(self, l: int, device: str | torch.device = "cpu") -> nn.Module:
        """Read decoder layer l into a fresh module on `device` (expert plan applied); returns it."""
        layer = self._copy(self.pristine[l])
        raw = self.reader.layer_raw(l)
        sd = to_native(raw, self.arch, self.adapter.spec.experts_attr)
        check_keys(l, sd, layer.state_dict().keys(), self.arch, self.layer_format(l))
        layer.load_state_dict({k: _cast(v, self.dtype).to(device) for k, v in sd.items()}, assign=True)
        del raw, sd
        self.adapter.layers[l] = layer
        self.live.add(l)
        self.peak_live = max(self.peak_live, len(self.live))
        self.materialised += 1
        if self.plan is not None and l in self.plan.layers:
            from ..models.surgery import apply_plan
            apply_plan(self.adapter, _restrict(self.plan, l))
        return layer

    def release(self, l: int) -> None:
        """Back to the meta device (shapes, hence expert counts, are kept)."""
        layer = self.adapter.layers[l]
        self.adapter.layers[l] = layer.to("meta")
        self.live.discard(l)

    def layer_state(self, l: int, dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
        """Layer l's tensors under their full checkpoint names (native format), cast to `dtype`."""
        pre = f"{self.adapter.spec.layers_path}.{l}."
        dt = dtype or self.ckpt_dtype
        return {pre + k: _cast(v, dt) for k, v in self.adapter.layers[l].state_dict().items()}

    def copy_side_files(self, dest: Path) -> None:
        """Tokenizer, generation config and remote-code files beside the weights."""
        for f in self.path.iterdir():
            if f.is_file() and not f.name.endswith(".safetensors") and f.name not in (
                    "config.json", "model.safetensors.index.json"):
                shutil.copy2(f, dest / f.name)


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t


def _restrict(plan: ExpertPlan, l: int) -> ExpertPlan:
    """The plan for layer l only (apply_plan records counts of all layers from their current shapes)."""
    return ExpertPlan(plan.method, plan.experts_before, {l: plan.layers[l]}, plan.removal, dict(plan.meta))

