"""Kurtosis of weights: STUN's proxy for robustness to later unstructured pruning.

Definitions (libraries differ, so both are always reported)::

    mu = mean(w), m2 = mean((w - mu)^2), m4 = mean((w - mu)^4)
    plain (Pearson) kurtosis  k    = m4 / m2^2     (normal = 3, uniform = 1.8, Laplace = 6)
    excess (Fisher) kurtosis  k_ex = k - 3         (= scipy.stats.kurtosis(fisher=True, bias=True))

Moments are combinable (n, mean, M2, M3, M4 of centred sums; Pebay 2008, the pairwise update of
Chan et al. extended to the 3rd and 4th moments): each chunk of a weight is read ONCE, its power
sums sum(x^p), p = 1..4, are centred in float64 (a chunk whose mean is not small against its
spread is summed again centred on its mean), and chunks, matrices, layers and the whole model are
merged from those summaries in float64. Pooled figures therefore cost no extra pass. Precision: here
a chunk's sums are taken in float32 for float32 / 16-bit weights (float64 for float64 weights), in
1 MB chunks: the kurtosis then agrees with a float64 computation to a few 1e-6 relative (worst
3e-6 over the matrices of a random 65 M-parameter Mixtral, dense and half-zero; tests allow 1e-5),
at about half the cost of float64 chunks. Larger chunks are faster still but less precise (7e-6
at 2 MB, 1.4e-5 at 4 MB). The post-run analysis usually takes the sums with the C extension instead
(``analysis.weight_report``: float32 over 256 terms, float64 beyond; worst 2e-7 on the benchmark's
small Mixtral); the report's ``sums`` names the engine.

Granularity (STUN's released code has no kurtosis computation and the paper's convention was not
published; this is our stated default):
  * per matrix: each expert's gate/up/down, each attention projection, the router;
  * per layer: unweighted mean over that layer's expert matrices, and the *pooled* kurtosis of all
    expert entries of the layer together (pooling matrices of different variance inflates it);
  * model-wide: unweighted mean over matrices and parameter-count-weighted mean, both for expert
    matrices only and for every targeted matrix; the mean over layers of the per-layer pooled value;
    and the pooled kurtosis of all expert entries / all targeted entries of the model as one sample
    (the paper's reported values, ~1.4e4, are only plausible for a pooled figure of that kind).
Measure dense weights (before unstructured pruning): the spike of zeros left by masks distorts the
value. ``nonzero_only=True`` uses only the non-zero entries, for pruned models; the report says so.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

CHUNK = 1 << 18   # entries per chunk (1 MB of float32): big enough that per-chunk Python work is negligible
RAW_OFFSET = 1e-2   # mean^2 / (mean^2 + variance) above which a chunk is centred before its sums
CONVENTION = ("plain = m4/m2^2 (normal = 3); excess = plain - 3; combinable central moments "
              "(fp32 partial sums, fp64 merges)")


@dataclass(frozen=True)
class Moments:
    """n, mean and the centred power sums M2 = sum (x-mean)^2, M3, M4 of a set of numbers."""
    n: int = 0
    mean: float = 0.0
    m2: float = 0.0
    m3: float = 0.0
    m4: float = 0.0

    def __add__(self, o: "Moments") -> "Moments":
        """The moments of the union (Pebay 2008, eq. 3.1 and 2.3)."""
        if o.n == 0:
            return self
        if self.n == 0:
            return o
        na, nb = self.n, o.n
        n = na + nb
        d = o.mean - self.mean
        dn = d / n
        m2 = self.m2 + o.m2 + d * dn * na * nb
        m3 = (self.m3 + o.m3 + d * dn * dn * na * nb * (na - nb)
              + 3.0 * dn * (na * o.m2 - nb * self.m2))
        m4 = (self.m4 + o.m4 + d * dn * dn * dn * na * nb * (na * na - na * nb + nb * nb)
              + 6.0 * dn * dn * (na * na * o.m2 + nb * nb * self.m2) + 4.0 * dn * (na * o.m3 - nb * self.m3))
        return Moments(n, self.mean + dn * nb, m2, m3, m4)

    def kurtosis(self, excess: bool = False) -> float:
        if self.n < 2 or not self.m2 > 0:
            return math.nan
        k = self.n * self.m4 / (self.m2 * self.m2)
        return k - 3.0 if excess else k


def chunk_moments(c: torch.Tensor, zeros: int = 0, scratch: Optional[torch.Tensor] = None) -> Moments:
    """Moments of one chunk (float32 or float64; ``c`` is not modified).

    ``zeros`` > 0: the moments of the chunk WITHOUT that many of its entries that are exactly 0
    (the non-zero entries, when ``zeros`` counts all of them). ``scratch``: a buffer [2, >= c's
    size] of c's dtype, reused across chunks.
    """
    if scratch is None:
        scratch = torch.empty(2, c.numel(), dtype=c.dtype, device=c.device)
    return sums_to_moments(c, power_sums(c, scratch), zeros, scratch)


def power_sums(c: torch.Tensor, scratch: torch.Tensor) -> tuple[float, float, float, float]:
    """S1..S4 = sum c^p of a chunk: one elementwise product (into ``scratch[1]``) and four reductions
    (dot products: BLAS, no temporaries). Zeros add nothing to them."""
    x2 = scratch[1, :c.numel()]
    torch.mul(c, c, out=x2)
    return float(c.sum()), float(x2.sum()), float(torch.dot(x2, c)), float(torch.dot(x2, x2))


def sums_to_moments(c: torch.Tensor, sums: tuple[float, float, float, float], zeros: int,
                    scratch: torch.Tensor) -> Moments:
    """Centred moments (in float64) from a chunk's power sums, without ``zeros`` of its zero entries.

    Centring raw sums loses precision when the mean is large against the spread (weights of Linear
    layers have mean^2 / variance ~ 1e-6); above ``RAW_OFFSET`` the chunk is summed again centred
    on its mean (``c`` and ``scratch`` serve that case).
    """
    n = c.numel() - zeros
    if n <= 0:
        return Moments()
    raw = raw_moments(n, sums)
    return raw if raw is not None else _centred_moments(c, n, sums[0] / n, zeros, scratch)


def raw_moments(n: int, sums: Sequence[float]) -> Optional[Moments]:
    """Centred moments of ``n`` numbers from their power sums S1..S4, or None where centring the raw
    sums would lose precision (see ``RAW_OFFSET``: the chunk must then be summed centred)."""
    s1, s2, s3, s4 = sums
    mu = s1 / n
    if not (s2 > 0 and n * mu * mu <= RAW_OFFSET * s2):
        return None
    m2 = s2 - s1 * mu
    m3 = s3 - 3.0 * mu * s2 + 2.0 * n * mu ** 3
    m4 = s4 - 4.0 * mu * s3 + 6.0 * mu * mu * s2 - 3.0 * n * mu ** 4
    return Moments(n, mu, m2, m3, m4)


def _centred_moments(c: torch.Tensor, n: int, mu: float, zeros: int, scratch: torch.Tensor) -> Moments:
    """Moments by centred sums (chunks far from zero mean): each removed zero contributed
    (0 - mean)^p to the centred sums, so it is subtracted."""
    d, d2 = scratch[0, :c.numel()], scratch[1, :c.numel()]
    torch.sub(c, mu, out=d)
    torch.mul(d, d, out=d2)
    m2, m3, m4 = float(d2.sum()), float(torch.dot(d2, d)), float(torch.dot(d2, d2))
    if zeros:
        m2, m3, m4 = m2 - zeros * mu ** 2, m3 + zeros * mu ** 3, m4 - zeros * mu ** 4
    return Moments(n, mu, m2, m3, m4)


ZeroCounter = Callable[[torch.Tensor], int]


class ChunkReader:
    """Reused chunk buffers (fresh large allocations page-fault on every chunk): float32 work for
    float32 and 16-bit weights (16-bit chunks are widened into a buffer first), float64 for float64."""

    def __init__(self, chunk: int, device: torch.device | str = "cpu") -> None:
        self.chunk, self.device = chunk, torch.device(device)
        self.bufs: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}

    def _buffers(self, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device != self.device:
            self.device, self.bufs = device, {}
        if dtype not in self.bufs:
            self.bufs[dtype] = (torch.empty(self.chunk, dtype=dtype, device=device),
                                torch.empty(2, self.chunk, dtype=dtype, device=device))
        return self.bufs[dtype]

    def moments(self, part: torch.Tensor, count_zeros: Optional[ZeroCounter] = None,
                drop_zeros: bool = False) -> tuple[int, Moments]:
        """(zero count, moments) of one chunk; moments of its non-zero entries when ``drop_zeros``.

        The power sums come first: they bring the chunk into cache, then ``count_zeros(part)``
        (default: torch's count) reads it from there (counting first, from memory, made the whole
        read ~15 % slower).
        """
        w, scratch = self._widened(part)
        sums = power_sums(w, scratch)
        if count_zeros is not None:
            zeros = count_zeros(part)
        else:
            zeros = part.numel() - int(torch.count_nonzero(part)) if drop_zeros else 0
        return zeros, sums_to_moments(w, sums, zeros if drop_zeros else 0, scratch)

    def from_sums(self, part: torch.Tensor, sums: Sequence[float], zeros: int) -> Moments:
        """Moments of one chunk from power sums taken elsewhere (the native scan), without ``zeros``
        of its zero entries; the chunk is read again only where it must be summed centred."""
        n = part.numel() - zeros
        if n <= 0:
            return Moments()
        raw = raw_moments(n, sums)
        if raw is not None:
            return raw
        w, scratch = self._widened(part)
        return _centred_moments(w, n, sums[0] / n, zeros, scratch)

    def _widened(self, part: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the chunk in its work dtype, the scratch buffer)."""
        work = torch.float64 if part.dtype == torch.float64 else torch.float32
        buf, scratch = self._buffers(work, part.device)
        if part.dtype == work:
            return part, scratch
        return buf[:part.numel()].copy_(part), scratch


def tensor_moments(t: torch.Tensor, nonzero_only: bool = False, chunk: int = CHUNK,
                   reader: Optional[ChunkReader] = None) -> Moments:
    """Moments of all (or only the non-zero) entries of ``t``, one read of the tensor."""
    flat, acc = t.detach().reshape(-1), Moments()
    reader = reader if reader is not None and reader.chunk == chunk else ChunkReader(chunk, flat.device)
    for i in range(0, flat.numel(), chunk):
        acc = acc + reader.moments(flat[i:i + chunk], drop_zeros=nonzero_only)[1]
    return acc


def pooled_kurtosis(tensors: Sequence[torch.Tensor], excess: bool = False,
                    nonzero_only: bool = False, chunk: int = CHUNK) -> float:
    """Kurtosis of all entries of ``tensors`` taken as one sample (NaN when undefined)."""
    acc = Moments()
    for t in tensors:
        acc = acc + tensor_moments(t, nonzero_only, chunk)
    return acc.kurtosis(excess)


def kurtosis(t: torch.Tensor, excess: bool = False, nonzero_only: bool = False,
             chunk: int = CHUNK) -> float:
    """Kurtosis of one tensor (all entries, or only the non-zero ones)."""
    return tensor_moments(t, nonzero_only, chunk).kurtosis(excess)


def _mean(vals: Sequence[float], weights: Sequence[float] | None = None) -> float:
    pairs = [(v, 1.0 if weights is None else w) for v, w in
             zip(vals, weights if weights is not None else vals) if not math.isnan(v)]
    tot = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / tot if tot > 0 else math.nan


def summarize(rows: Sequence[dict], pooled: dict[int, float],
              model_pooled: dict[str, float] | None = None) -> dict[str, Any]:
    """Per-layer and model-wide aggregates from per-matrix rows (keys layer, kind, n, kurtosis)."""
    per_layer: dict[str, dict[str, float]] = {}
    for layer in sorted({r["layer"] for r in rows}):
        lr = [r for r in rows if r["layer"] == layer]
        ex = [r["kurtosis"] for r in lr if r["kind"] == "expert"]
        per_layer[str(layer)] = {"expert_mean": _mean(ex), "expert_pooled": pooled.get(layer, math.nan),
                                 "all_mean": _mean([r["kurtosis"] for r in lr])}
    model: dict[str, float] = {}
    for scope, sel in (("expert", [r for r in rows if r["kind"] == "expert"]), ("all", list(rows))):
        vals, ns = [r["kurtosis"] for r in sel], [float(r["n"]) for r in sel]
        model[f"{scope}_mean"] = _mean(vals)
        model[f"{scope}_weighted"] = _mean(vals, ns)
    model["expert_pooled_layer_mean"] = _mean([per_layer[k]["expert_pooled"] for k in per_layer])
    model.update(model_pooled or {})
    for k in list(model):
        model[f"{k}_excess"] = model[k] - 3.0
    return {"per_layer": per_layer, "model": model}


def kurtosis_report(adapter: Any, nonzero_only: bool = False, chunk: int = CHUNK) -> dict[str, Any]:
    """Kurtosis of every prunable matrix of the model behind ``adapter`` (see module docstring).

    Returns ``{"nonzero_only", "convention", "per_matrix": [...], "per_layer": {layer: {...}},
    "model": {...}}``; per-layer and model values are plain kurtosis (``*_excess`` = minus 3).
    Each weight is read once; ``analysis.weight_report`` adds the census and mask digest to the
    same read.
    """
    reader = ChunkReader(chunk)
    rows = [(layer, t, tensor_moments(t.weight, nonzero_only, chunk, reader))
            for layer in range(len(adapter.layers)) for t in adapter.linear_targets(layer)]
    return report_from_moments(rows, nonzero_only, "torch")


def report_from_moments(rows: Sequence[tuple[int, Any, Moments]], nonzero_only: bool,
                        sums: Optional[str] = None) -> dict[str, Any]:
    """The kurtosis report from per-matrix moments (layer, target, Moments); pooled values merge them.
    ``sums``: the engine(s) that took the power sums (``analysis.weight_report.engine``), recorded."""
    per_matrix: list[dict[str, Any]] = []
    pooled_layer: dict[int, Moments] = {}
    expert_all, everything = Moments(), Moments()
    for layer, t, mom in rows:
        k = mom.kurtosis()
        per_matrix.append({"layer": layer, "name": t.name, "kind": t.kind, "expert": t.expert,
                           "matrix": t.matrix, "n": mom.n, "kurtosis": k, "excess_kurtosis": k - 3.0})
        everything = everything + mom
        if t.kind == "expert":
            pooled_layer[layer] = pooled_layer.get(layer, Moments()) + mom
            expert_all = expert_all + mom
    out = {"nonzero_only": nonzero_only,
           "label": "non-zero entries only" if nonzero_only else "all entries",
           "convention": CONVENTION, "sums": sums, "per_matrix": per_matrix}
    pooled = {layer: m.kurtosis() for layer, m in pooled_layer.items()}
    out.update(summarize(per_matrix, pooled, {"expert_pooled": expert_all.kurtosis(),
                                              "all_pooled": everything.kurtosis()}))
    return out
