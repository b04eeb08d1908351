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

Two engines take a chunk's figures, with the same outputs (tested: the counts and the digest are
equal, the kurtosis agrees to ~1e-6 relative):
  * ``native``: float32 and bfloat16 weights on the CPU, when the package was built with its C
    extension (``_scan.c``, compiled at install where a C compiler is present). Every entry is read
    once for its power sums, zero count and zero bit: the scan takes about a third of the torch
    chain's time, a whole read after pruning under half of it (64 vs 148 ms on the benchmark's
    small model, 84 vs 177 ms on its wide one), and it is closer to a float64 computation (its
    float32 sums run over 256 terms).
  * ``torch``: every other weight (other dtypes, weights on an accelerator, an install without the
    extension): a product, four reductions, a comparison and a bit packing per chunk.
The kurtosis report records the engine(s) that read the weights (``sums``).

On CPU the weights are read by ``torch.get_num_threads()`` worker threads, a run of consecutive
weights per task (the native scan releases the GIL; a torch worker runs torch single-threaded: a
chain of short operations parallelises poorly inside one operation, while whole weights are
independent). The census' other parameters (embeddings, norms) are counted by a worker beside
them. The digest is fed in target order by the calling thread. Each weight's sums are taken by one
thread whatever the thread count, so the kurtosis does not depend on it.
"""
from __future__ import annotations

import contextlib
import functools
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np
import torch

from stun_exp.analysis import kurtosis as K
from stun_exp.analysis import sparsity as S

try:
    from stun_exp.analysis import _scan as native
except ImportError:          # installed without a C compiler: the torch engine reads every weight
    native = None

_NATIVE_KINDS = {torch.float32: 0, torch.bfloat16: 1}      # _scan.c's ``kind`` codes
TASK_BYTES = 16 << 20      # weight bytes per worker task (see ``_scans``)

Scan = tuple[int, K.Moments, list]     # (non-zero count, moments, the packed zero bits in pieces)


def _zeros(part: torch.Tensor, bits: Optional[list], buf: Any) -> int:
    """Zero count of a flat chunk; its packed zero bits are appended to ``bits`` (when given).
    numpy is the fast path on CPU; ``buf``: a reused numpy bool array of at least the chunk's size,
    as a fresh one page-faults."""
    arr = S.as_numpy(part)
    if arr is not None:
        z = np.equal(arr, 0, out=buf[:part.numel()])
        if bits is not None:
            bits.append(np.packbits(z))
        return int(np.count_nonzero(z))
    if bits is None:
        return part.numel() - int(torch.count_nonzero(part))
    z = (part == 0).cpu().numpy()
    bits.append(np.packbits(z))
    return int(np.count_nonzero(z))


class _Reader:
    """One thread's chunk buffers (moments and zero bits)."""

    def __init__(self, chunk: int) -> None:
        self.chunks, self.buf = K.ChunkReader(chunk), np.empty(chunk, dtype=bool)


def engine(w: torch.Tensor) -> str:
    """The engine that reads ``w``: ``native`` or ``torch`` (see the module docstring)."""
    return "native" if native is not None and w.device.type == "cpu" and w.dtype in _NATIVE_KINDS else "torch"


def engines(weights: Iterable[torch.Tensor]) -> str:
    """The engines that read ``weights``, e.g. ``native`` or ``native+torch``."""
    return "+".join(sorted({engine(w) for w in weights}))


def _scan(w: torch.Tensor, nonzero_only: bool, digest: bool, reader: _Reader) -> Scan:
    """(non-zero count, moments, zero bits) of one weight."""
    if engine(w) == "native":
        return _native_scan(w.detach().reshape(-1), nonzero_only, digest, reader.chunks)
    flat, acc, zeros, chunk = w.detach().reshape(-1), K.Moments(), 0, reader.chunks.chunk
    bits: Optional[list] = [] if digest else None
    count = functools.partial(_zeros, bits=bits, buf=reader.buf)
    for i in range(0, flat.numel(), chunk):
        z, mom = reader.chunks.moments(flat[i:i + chunk], count, nonzero_only)
        zeros, acc = zeros + z, acc + mom
    return flat.numel() - zeros, acc, bits or []


def _native_scan(flat: torch.Tensor, nonzero_only: bool, digest: bool, chunks: K.ChunkReader) -> Scan:
    """``_scan`` by the C extension: one pass for every chunk's power sums and zero count and the
    whole weight's zero bits (the bytes ``np.packbits`` gives chunk by chunk, as chunks hold a
    multiple of 8 entries); moments are then formed per chunk, as the torch engine forms them."""
    n, chunk = flat.numel(), chunks.chunk
    sums, zeros = np.empty((-(-n // chunk), 4)), np.empty(-(-n // chunk), dtype=np.int64)
    bits = np.empty(-(-n // 8), dtype=np.uint8) if digest else None
    src = flat.numpy() if flat.dtype == torch.float32 else flat.view(torch.int16).numpy()
    native.scan(src, _NATIVE_KINDS[flat.dtype], chunk, sums, zeros, bits)
    acc = K.Moments()
    for i, (s, z) in enumerate(zip(sums.tolist(), zeros.tolist())):
        acc = acc + chunks.from_sums(flat[i * chunk:(i + 1) * chunk], s, z if nonzero_only else 0)
    return n - int(zeros.sum()), acc, [bits] if digest else []


def _workers(weights: list[torch.Tensor]) -> int:
    """Worker threads for the read, one per torch thread; 0: the calling thread reads (weights off
    the CPU, or torch already single-threaded, which is what a worker would be)."""
    threads = torch.get_num_threads()
    if not weights or threads == 1 or any(w.device.type != "cpu" for w in weights):
        return 0
    return min(threads, len(weights))


@contextlib.contextmanager
def _readers(weights: list[torch.Tensor]) -> Iterator[Optional[ThreadPoolExecutor]]:
    """The worker threads that read ``weights`` (None: the calling thread reads), each running torch
    single-threaded; the caller's thread count is restored after (new threads inherit the setting
    a worker changed)."""
    n = _workers(weights)
    if n == 0:
        yield None
        return
    threads = torch.get_num_threads()
    pool = ThreadPoolExecutor(n, thread_name_prefix="weight-read", initializer=torch.set_num_threads,
                              initargs=(1,))
    try:
        yield pool
    finally:                        # also on an error or an early close: drop the tasks not started
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(threads)


def _batches(weights: list[torch.Tensor], size: int) -> list[list[torch.Tensor]]:
    """Consecutive weights in groups of at least ``size`` bytes (the last may hold less)."""
    out: list[list[torch.Tensor]] = [[]]
    held = 0
    for w in weights:
        if held >= size:
            out.append([])
            held = 0
        out[-1].append(w)
        held += w.numel() * w.element_size()
    return [b for b in out if b]


def _scans(weights: list[torch.Tensor], nonzero_only: bool, digest: bool, chunk: int,
           pool: Optional[ThreadPoolExecutor]) -> Iterator[Scan]:
    """The scans of ``weights`` in order. The workers take consecutive weights ``TASK_BYTES`` at a
    time (a task per weight spent more time handing weights and results between threads than a
    small expert's scan takes), at most two tasks per worker in flight (bounds the zero bits held
    for the digest)."""
    if pool is None:
        reader = _Reader(chunk)
        for w in weights:
            yield _scan(w, nonzero_only, digest, reader)
        return
    local = threading.local()

    def task(ws: list[torch.Tensor]) -> list[Scan]:
        if not hasattr(local, "reader"):
            local.reader = _Reader(chunk)
        return [_scan(w, nonzero_only, digest, local.reader) for w in ws]

    pending: deque = deque()
    in_flight = 2 * _workers(weights)
    try:
        for ws in _batches(weights, TASK_BYTES):
            pending.append(pool.submit(task, ws))
            if len(pending) >= in_flight:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()
    finally:
        for f in pending:
            f.cancel()


def read_targets(items: Iterable[tuple[int, Any]], nonzero_only: bool, digest: Optional[Any],
                 chunk: int = K.CHUNK, pool: Optional[ThreadPoolExecutor] = None
                 ) -> list[tuple[int, Any, int, int, K.Moments]]:
    """(layer, target, numel, non-zero count, moments) of each (layer, target) in ``items``, read
    once; their headers and zero bits go to the running ``digest`` (``sparsity.new_digest``, when
    given) in order, as ``sparsity.digest_layer`` writes them. ``pool``: the ``_readers`` to use
    (by default, its own)."""
    items = list(items)
    weights = [t.weight for _, t in items]
    if pool is None:
        with _readers(weights) as own:
            return _read(items, weights, nonzero_only, digest, chunk, own)
    return _read(items, weights, nonzero_only, digest, chunk, pool)


def _read(items: list[tuple[int, Any]], weights: list[torch.Tensor], nonzero_only: bool,
          digest: Optional[Any], chunk: int, pool: Optional[ThreadPoolExecutor]) -> list:
    chunk = max(8, chunk - chunk % 8)
    rows = []
    scans = _scans(weights, nonzero_only, digest is not None, chunk, pool)
    try:
        for (nz, mom, bits), (l, t) in zip(scans, items):
            if digest is not None:
                digest.update(S.digest_header(l, t))
                for b in bits:
                    digest.update(b)
            rows.append((l, t, t.weight.numel(), nz, mom))
    finally:
        scans.close()           # on an error: drop the tasks not started
    return rows


def weight_report(model: torch.nn.Module, adapter: Any, nonzero_only: bool = False,
                  is_targeted: Optional[Callable[[Any], bool]] = None, digest: bool = True,
                  chunk: int = K.CHUNK) -> dict[str, Any]:
    """``{"census", "kurtosis", "mask_digest"}`` (+ ``"targeted": (numel, zeros)`` when a filter is
    given). ``digest=False`` skips the zero-pattern hash (``mask_digest`` is then None)."""
    h = S.new_digest() if digest else None
    items = [(l, t) for l in range(len(adapter.layers)) for t in adapter.linear_targets(l)]
    weights = [t.weight for _, t in items]
    others = S.untiled_params(model, weights)
    with _readers(weights) as pool:     # the census' other parameters are counted beside the scans
        other_nz = pool.submit(S.nonzero_total, others) if pool is not None else None
        rows = read_targets(items, nonzero_only, h, chunk, pool)
        other = other_nz.result() if other_nz is not None else S.nonzero_total(others)
    counts = [(l, t, n, nz) for l, t, n, nz, _ in rows]
    out = {"census": S.census_from_counts(model, adapter, counts, other),
           "kurtosis": K.report_from_moments([(l, t, mom) for l, t, _, _, mom in rows], nonzero_only,
                                             engines(t.weight for _, t in items)),
           "mask_digest": h.hexdigest()[:16] if h is not None else None}
    if is_targeted is not None:
        sel = [(n, n - nz) for _, t, n, nz in counts if is_targeted(t)]
        out["targeted"] = (sum(n for n, _ in sel), sum(z for _, z in sel))
    return out
