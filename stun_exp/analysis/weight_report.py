"""One read of every decoder weight for the whole post-run analysis: census, kurtosis, mask digest.

``weight_report(model, adapter, nonzero_only)`` walks the targets of ``adapter.linear_targets`` in
the ledger's order, reads each weight once in small chunks and takes from each chunk
  * its zero count (census, sparsity ledger, optional targeted counts),
  * its zero pattern as packed bits (the mask digest; chunks hold a multiple of 8 entries, so the
    bytes equal packing the whole matrix at once),
  * its combinable central moments (kurtosis per matrix; per-layer and model pooled values are
    merged from them, see ``kurtosis.Moments``).
The outputs have the shapes of ``sparsity.census``, ``kurtosis.kurtosis_report`` and
``sparsity.mask_digest`` (tested equal), so a run calls this once where it called those three.
"""
from __future__ import annotations

import functools
import hashlib
from typing import Any, Callable, Optional

import torch

from stun_exp.analysis import kurtosis as K
from stun_exp.analysis import sparsity as S


def _zeros(part: torch.Tensor, digest: Optional[Any], buf: Any) -> int:
    """Zero count of a flat chunk; its zero bits go to ``digest`` (numpy is the fast path on CPU;
    ``buf``: a reused numpy bool array of at least the chunk's size, as a fresh one page-faults)."""
    import numpy as np
    if part.device.type == "cpu" and part.dtype in (torch.float32, torch.float16, torch.float64):
        z = np.equal(part.numpy(), 0, out=buf[:part.numel()])
        if digest is not None:
            digest.update(np.packbits(z).tobytes())
        return int(np.count_nonzero(z))
    if digest is None:
        return part.numel() - int(torch.count_nonzero(part))
    z = (part == 0).cpu().numpy()
    digest.update(np.packbits(z).tobytes())
    return int(np.count_nonzero(z))


def _scan(w: torch.Tensor, nonzero_only: bool, reader: K.ChunkReader, digest: Optional[Any],
          buf: Any) -> tuple[int, K.Moments]:
    """(non-zero count, moments) of one weight; feeds its zero bits to ``digest`` (when given)."""
    flat, acc, zeros, chunk = w.detach().reshape(-1), K.Moments(), 0, reader.chunk
    count = functools.partial(_zeros, digest=digest, buf=buf)
    for i in range(0, flat.numel(), chunk):
        part = flat[i:i + chunk]
        z, mom = reader.moments(part, count, nonzero_only)
        zeros, acc = zeros + z, acc + mom
    return flat.numel() - zeros, acc


def scan_target(l: int, t: Any, nonzero_only: bool, reader: K.ChunkReader, digest: Optional[Any],
                buf: Any) -> tuple[int, K.Moments]:
    """(non-zero count, moments) of target ``t`` of layer ``l``; its header and zero bits go to
    ``digest`` (when given) as ``sparsity.digest_layer`` writes them."""
    if digest is not None:
        digest.update(f"{l}:{t.name}:{tuple(t.weight.shape)}".encode())
    return _scan(t.weight, nonzero_only, reader, digest, buf)


def weight_report(model: torch.nn.Module, adapter: Any, nonzero_only: bool = False,
                  is_targeted: Optional[Callable[[Any], bool]] = None, digest: bool = True,
                  chunk: int = K.CHUNK) -> dict[str, Any]:
    """``{"census", "kurtosis", "mask_digest"}`` (+ ``"targeted": (numel, zeros)`` when a filter is
    given). ``digest=False`` skips the zero-pattern hash (``mask_digest`` is then None)."""
    chunk = max(8, chunk - chunk % 8)
    h = hashlib.sha256() if digest else None
    import numpy as np
    reader, buf = K.ChunkReader(chunk), np.empty(chunk, dtype=bool)
    counts, rows = [], []
    for l in range(len(adapter.layers)):
        for t in adapter.linear_targets(l):
            nz, mom = scan_target(l, t, nonzero_only, reader, h, buf)
            counts.append((l, t, t.weight.numel(), nz))
            rows.append((l, t, mom))
    out = {"census": S.census_from_counts(model, adapter, counts),
           "kurtosis": K.report_from_moments(rows, nonzero_only),
           "mask_digest": h.hexdigest()[:16] if h is not None else None}
    if is_targeted is not None:
        sel = [(n, n - nz) for _, t, n, nz in counts if is_targeted(t)]
        out["targeted"] = (sum(n for n, _ in sel), sum(z for _, z in sel))
    return out
