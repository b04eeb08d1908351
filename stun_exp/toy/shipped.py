"""The pretrained default toy that ships inside the package, so a first run trains nothing.

``stun_exp/toy/shipped/`` holds the weights (``model.safetensors``, fp32), ``config.json``,
``generation_config.json``, the tokenizer and ``toy_meta.json`` of the default ``model=toy``, as
built by ``stun_exp.toy.build`` on one machine (recorded in the meta: CPU, thread count, torch,
transformers, the experts implementation, the seed, the recipe version and the cache key), plus
the SHA-256 of the weights file. ``ensure_toy`` installs it into the user's cache (a plain copy,
then the seeded task files are written there) when the requested config hashes to the shipped
key, so task files and the cached dense evaluation live in a writable place even when the package
is installed read-only. Any other config (another seed, size or step count) is trained.

Training is deterministic per machine and thread count only: a rebuild on another CPU gives other
weights (and, near the arithmetic task's learning transition, other scores). That is why the
weights ship rather than the recipe alone; ``python -m stun_exp.toy rebuild`` retrains them.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Optional

SHIPPED_DIR = Path(__file__).resolve().parent / "shipped"
WEIGHTS = "model.safetensors"
META = "toy_meta.json"
# Everything a checkpoint dir needs to load with from_pretrained, plus the build record.
FILES = ("config.json", "generation_config.json", WEIGHTS, "tokenizer.json", "tokenizer_config.json", META)
MAX_BYTES = 20 * 2**20


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def shipped_meta(directory: Optional[Path] = None) -> Optional[dict]:
    """The shipped toy's build record, or None when this install carries no shipped toy."""
    directory = directory or SHIPPED_DIR
    p = directory / META
    if not all((directory / f).is_file() for f in FILES):
        return None
    return json.loads(p.read_text())


def shipped_key(directory: Optional[Path] = None) -> Optional[str]:
    meta = shipped_meta(directory)
    return meta["key"] if meta else None


def install(dest: Path, seed: int, directory: Optional[Path] = None) -> None:
    """Copy the shipped checkpoint into ``dest`` (an empty temp dir of the cache) and write its
    task files; the weights are checked against their recorded SHA-256 first."""
    directory = directory or SHIPPED_DIR
    meta = shipped_meta(directory)
    if meta is None:
        raise FileNotFoundError(f"no complete shipped toy under {directory}")
    digest = sha256(directory / WEIGHTS)
    if digest != meta["weights_sha256"]:
        raise RuntimeError(f"shipped toy weights {directory / WEIGHTS} are corrupt: sha256 {digest}, "
                           f"recorded {meta['weights_sha256']}")
    for name in FILES:
        if name != META:
            shutil.copyfile(directory / name, dest / name)
    meta["source"] = f"shipped with the package ({directory})"
    from stun_exp.toy.tasks import write_task_files
    write_task_files(dest, seed)
    (dest / META).write_text(json.dumps(meta, indent=2))


def publish(model_dir: Path, directory: Optional[Path] = None) -> dict:
    """Make the built toy in ``model_dir`` the shipped one (what ``rebuild`` ends with)."""
    directory, model_dir = Path(directory or SHIPPED_DIR), Path(model_dir)
    size = (model_dir / WEIGHTS).stat().st_size
    if size > MAX_BYTES:
        raise ValueError(f"{model_dir / WEIGHTS} is {size / 2**20:.1f} MiB; the shipped toy must stay "
                         f"<= {MAX_BYTES / 2**20:.0f} MiB")
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.iterdir():
        if old.is_file():
            old.unlink()
    for name in FILES:
        if name != META:
            shutil.copyfile(model_dir / name, directory / name)
    meta = json.loads((model_dir / META).read_text())
    meta.pop("source", None)
    meta["weights_sha256"] = sha256(directory / WEIGHTS)
    meta["weights_bytes"] = size
    (directory / META).write_text(json.dumps(meta, indent=2) + "\n")
    return meta
