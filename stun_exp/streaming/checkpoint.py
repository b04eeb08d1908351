"""Sharded safetensors checkpoints read one decoder layer at a time, and written the same way.

Reading: ``CheckpointReader`` opens every shard with ``safe_open`` (memory-mapped: a tensor costs
memory only once it is read) and groups keys by decoder layer (``<layers_path>.<l>.``). Keys outside
the decoder layers (embeddings, final norm, head) are "globals".

Key formats: the module state-dict names of the model class are the *native* format (what
``save_pretrained(..., save_original_format=False)`` writes in transformers 5: fused
``mlp.experts.gate_up_proj [E, 2I, H]`` / ``down_proj [E, H, I]``). transformers 5 writes several
architectures in their *legacy* format by default: Mixtral and PhiMoE per expert
(``block_sparse_moe.experts.<e>.w1/w2/w3.weight``, PhiMoE's router as ``gate``), Qwen-style models per
expert (``mlp.experts.<e>.gate_proj/up_proj/down_proj.weight``), GraniteMoE with other names for its
fused tensors (``input_linear`` / ``output_linear`` / ``router.layer``). ``LEGACY`` below (data, one
entry per arch) converts those to native names as transformers' ``conversion_mapping`` does (renames,
then per-expert matrices stacked, gate rows before up rows). A layer whose converted keys still do not
match the model raises ``CheckpointFormatError`` naming the keys.

Writing: ``ShardedWriter`` writes one shard per call (a decoder layer, or the globals) and an index
file ``model.safetensors.index.json`` whose weight map covers every key, as transformers expects.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class CheckpointFormatError(ValueError):
    """A checkpoint whose keys the streaming reader cannot map onto the model."""


@dataclass(frozen=True)
class LegacyExperts:
    """A legacy key format of a fused-layout architecture: renames, then (optionally) per-expert keys."""
    names: Optional[tuple[str, str, str]] = None     # gate, up, down names under experts.<e>. (per expert)
    renames: tuple[tuple[str, str], ...] = ()        # (checkpoint fragment, native fragment), whole path parts


_QWEN_STYLE = LegacyExperts(("gate_proj", "up_proj", "down_proj"))
LEGACY: dict[str, LegacyExperts] = {
    "mixtral": LegacyExperts(("w1", "w3", "w2"), (("block_sparse_moe.", "mlp."),)),
    "phimoe": LegacyExperts(("w1", "w3", "w2"),
                            (("block_sparse_moe.", "mlp."), ("mlp.gate.weight", "mlp.router.weight"))),
    "granitemoe": LegacyExperts(None, (
        ("block_sparse_moe.input_linear.weight", "block_sparse_moe.experts.gate_up_proj"),
        ("block_sparse_moe.output_linear.weight", "block_sparse_moe.experts.down_proj"),
        ("block_sparse_moe.router.layer.weight", "block_sparse_moe.router.weight"))),
    "qwen2_moe": _QWEN_STYLE, "qwen3_moe": _QWEN_STYLE, "olmoe": _QWEN_STYLE,
    "deepseek_v2": _QWEN_STYLE, "deepseek_v3": _QWEN_STYLE,
}


class CheckpointReader:
    """Memory-mapped access to a (sharded) safetensors checkpoint, grouped by decoder layer."""

    def __init__(self, path: str | Path, layers_path: str = "model.layers") -> None:
        self.path = Path(path)
        self.weight_map = _weight_map(self.path)
        pat = re.compile(rf"^{re.escape(layers_path)}\.(\d+)\.(.+)$")
        self.layer_keys: dict[int, dict[str, str]] = {}   # layer -> relative name -> full key
        self.global_keys: list[str] = []
        for key in self.weight_map:
            m = pat.match(key)
            if m:
                self.layer_keys.setdefault(int(m.group(1)), {})[m.group(2)] = key
            else:
                self.global_keys.append(key)
        self.layers_path = layers_path

    def _open(self, name: str) -> Any:
        return safe_open(str(self.path / name), framework="pt", device="cpu")

    def read(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        """The tensors of `keys` as private copies.

        safetensors hands out tensors backed by the file mapping; pages touched through a mapping
        that stays open count in the process RSS until it is closed, so every read opens the shard,
        copies, and closes it (the copy also keeps in-place pruning away from the source file).
        """
        by_file: dict[str, list[str]] = {}
        for k in keys:
            by_file.setdefault(self.weight_map[k], []).append(k)
        out: dict[str, torch.Tensor] = {}
        for name, ks in by_file.items():
            with self._open(name) as f:
                for k in ks:
                    out[k] = f.get_tensor(k).clone()
        return out

    def get(self, key: str) -> torch.Tensor:
        return self.read([key])[key]

    def get_slice(self, key: str, index: int) -> torch.Tensor:
        """``tensor[index]`` read without reading the rest of the tensor."""
        with self._open(self.weight_map[key]) as f:
            return f.get_slice(key)[index].clone()

    def dtype(self) -> torch.dtype:
        """The dtype of the first floating tensor (the checkpoint's storage dtype)."""
        for name in sorted(set(self.weight_map.values())):
            with self._open(name) as f:
                for key in f.keys():
                    dt = _DTYPES.get(f.get_slice(key).get_dtype())
                    if dt is not None and dt.is_floating_point:
                        return dt
        return torch.float32

    def layer_raw(self, l: int) -> dict[str, torch.Tensor]:
        """Decoder layer l's tensors under their relative (checkpoint-format) names."""
        keys = self.layer_keys.get(l, {})
        got = self.read(keys.values())
        return {rel: got[full] for rel, full in keys.items()}

    def globals(self) -> dict[str, torch.Tensor]:
        return self.read(self.global_keys)


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "BOOL": torch.bool, "U8": torch.uint8}


def _weight_map(path: Path) -> dict[str, str]:
    index = path / INDEX_NAME
    if index.is_file():
        return dict(json.loads(index.read_text())["weight_map"])
    single = path / SINGLE_NAME
    if single.is_file():
        with safe_open(str(single), framework="pt", device="cpu") as f:
            return {k: SINGLE_NAME for k in f.keys()}
    raise CheckpointFormatError(f"{path}: no {INDEX_NAME} or {SINGLE_NAME} (streaming needs safetensors)")


# ---- key formats ---------------------------------------------------------------------------------
def detect_format(rel_keys: Iterable[str], arch: str, experts_attr: str = "experts") -> str:
    """'legacy' if the layer's keys are in the architecture's legacy format (per-expert matrices, or a
    renamed block), else 'native'."""
    rule = LEGACY.get(arch)
    if rule is None:
        return "native"
    keys = list(rel_keys)
    if rule.names is not None:
        pat = re.compile(rf"(^|\.){experts_attr}\.\d+\.{rule.names[0]}\.weight$")
        if any(pat.search(k) for k in keys):
            return "legacy"
    return "legacy" if any(_has_part(k, src) for k in keys for src, _ in rule.renames) else "native"


def _has_part(key: str, fragment: str) -> bool:
    return key.startswith(fragment) or f".{fragment}" in key


def to_native(raw: dict[str, torch.Tensor], arch: str, experts_attr: str = "experts") -> dict[str, torch.Tensor]:
    """Convert one layer's relative keys to the model's native names (no-op for native layers)."""
    if detect_format(raw, arch, experts_attr) == "native":
        return dict(raw)
    rule = LEGACY[arch]
    out: dict[str, torch.Tensor] = {}
    per: dict[str, dict[int, dict[str, torch.Tensor]]] = {}   # block prefix -> expert -> mat
    pat = re.compile(rf"^(.*){experts_attr}\.(\d+)\.(\w+)\.weight$")
    for key, t in raw.items():
        key = _rename(key, rule.renames)
        m = pat.match(key)
        if m and rule.names is not None and m.group(3) in rule.names:
            per.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = t
        else:
            out[key] = t
    if rule.names is None:
        return out
    g, u, d = rule.names
    for prefix, experts in per.items():
        ids = sorted(experts)
        if ids != list(range(len(ids))):
            raise CheckpointFormatError(f"legacy experts under {prefix!r}: ids {ids} are not 0..n-1")
        out[f"{prefix}{experts_attr}.gate_up_proj"] = torch.stack(
            [torch.cat([experts[e][g], experts[e][u]], dim=0) for e in ids])
        out[f"{prefix}{experts_attr}.down_proj"] = torch.stack([experts[e][d] for e in ids])
    return out


def native_key(rel: str, arch: str, fmt: str) -> str:
    """The checkpoint's name for a native key (the router, a fused expert tensor) under format `fmt`."""
    rule = LEGACY.get(arch)
    if fmt == "native" or rule is None:
        return rel
    return _rename(rel, tuple((dst, src) for src, dst in reversed(rule.renames)))


def _rename(key: str, renames: tuple[tuple[str, str], ...]) -> str:
    """Apply (from, to) renames of whole dotted path parts, in order."""
    for src, dst in renames:
        key = re.sub(rf"(^|\.){re.escape(src)}", rf"\g<1>{dst}", key, count=1)
    return key


def check_keys(l: int, got: Iterable[str], want: Iterable[str], arch: str, fmt: str) -> None:
    got_s, want_s = set(got), set(want)
    if got_s == want_s:
        return
    missing, extra = sorted(want_s - got_s)[:6], sorted(got_s - want_s)[:6]
    known = "native (transformers 5 fused)" + (" and its legacy format" if arch in LEGACY else "")
    raise CheckpointFormatError(
        f"decoder layer {l}: checkpoint keys (format {fmt!r}) do not match the {arch} model: missing "
        f"{missing}, unexpected {extra}. Streaming reads these key formats for {arch}: {known}")


# ---- writing -------------------------------------------------------------------------------------
class ShardedWriter:
    """One safetensors shard per ``write`` call, then ``close`` writes the index file."""

    def __init__(self, path: str | Path, n_shards: int) -> None:
        self.path, self.n = Path(path), n_shards
        self.path.mkdir(parents=True, exist_ok=True)
        self.weight_map: dict[str, str] = {}
        self.total_size = 0
        self.i = 0

    def write(self, tensors: dict[str, torch.Tensor]) -> str:
        if self.i >= self.n:
            raise RuntimeError(f"more than the {self.n} announced shards")
        self.i += 1
        name = f"model-{self.i:05d}-of-{self.n:05d}.safetensors"
        clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
        save_file(clean, str(self.path / name), metadata={"format": "pt"})
        for k, v in clean.items():
            self.weight_map[k] = name
            self.total_size += v.numel() * v.element_size()
        return name

    def close(self) -> Path:
        if self.i != self.n:
            raise RuntimeError(f"wrote {self.i} of {self.n} announced shards")
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
        out = self.path / INDEX_NAME
        out.write_text(json.dumps(index, indent=2) + "\n")
        return out
