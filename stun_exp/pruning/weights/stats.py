"""Per-matrix input statistics the scores need, collected during a decoder-layer forward.

``TargetStats`` is what a pruner sees for one target:
  sq      sum over the tokens the matrix saw of x_j^2                  [C_in]
  gsq     sum of (g_t x_tj)^2 with g the routing weight (experts only) [C_in] or None
  gram    sum of x x^T (SparseGPT Hessian up to scale)                 [C_in, C_in] or None
  ncalls  forward calls (calibration samples) in which the matrix saw >= 1 token
  nblock  forward calls of the decoder layer while observing (every calibration sample)
  ntokens tokens seen

The reference (Wanda ``WrappedGPT.add_batch``, STUN's copy) keeps sq as a running mean over
the calls of the module's forward hook, i.e. sq / (number of calls); ``norm_sq``/``norm_gsq``
reproduce that. Which calls count depends on how the model code calls its experts:
  block_calls   every call of the MoE block is one sample for every expert, routed or not:
                STUN's Mixtral modelling code (thnkinbtfly/STUN ``utils/modeling_mixtral.py``,
                ``MixtralSparseMoeBlock.forward``) runs every expert on every call, an expert
                without tokens on an empty batch, and ``add_batch`` counts that call too;
  routed_calls  only the calls in which the expert received >= 1 token: STUN's Arctic modelling
                code (``utils/modeling_arctic.py``, ``ArcticMoE._moe_foreward``) skips an expert
                with no tokens, so its hook does not fire.
For non-expert matrices both are the number of samples. The division never changes a
within-row ranking; it does change OWL's pooled outlier ratio (experts see fewer tokens).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn


@dataclass
class TargetStats:
    sq: Tensor
    gsq: Optional[Tensor] = None
    gram: Optional[Tensor] = None
    ncalls: int = 0
    ntokens: int = 0
    nblock: int = 0

    def samples(self, per: str = "routed_calls") -> int:
        """The reference's sample count: ``routed_calls`` or ``block_calls`` (module docstring)."""
        if per == "routed_calls":
            return self.ncalls
        if per == "block_calls":
            return max(self.nblock, self.ncalls)
        raise ValueError(f"unknown sample count {per!r}; known: block_calls, routed_calls")

    def norm_sq(self, per: str = "routed_calls") -> Tensor:
        return self.sq / max(self.samples(per), 1)

    def norm_gsq(self, per: str = "routed_calls") -> Tensor:
        src = self.gsq if self.gsq is not None else self.sq
        return src / max(self.samples(per), 1)


class SharedInputs:
    """One layer forward's input statistics, computed once per distinct input tensor.

    Several matrices often read the same tensor (q, k and v all read the normed hidden states of one
    attention call): their hooks then share one (sum of x^2, x^T x) instead of recomputing it per
    matrix. Each hook still adds the shared values to its own sums, in its own order, so every
    result equals a per-matrix computation bit for bit. Only the last input is kept, and it is
    recognised by identity and in-place version, so a tensor changed or replaced is recomputed.
    """

    def __init__(self) -> None:
        self._key: Optional[tuple] = None
        self._src: Optional[Tensor] = None
        self._value: Optional[tuple[int, Tensor, Optional[Tensor]]] = None

    def contribution(self, src: Tensor, c_in: int, gram: bool) -> tuple[int, Tensor, Optional[Tensor]]:
        """(tokens, sum over tokens of x^2, x^T x or None) of the input ``src`` as x [tokens, c_in]
        in float32."""
        key = (_version(src), c_in, gram)
        if self._src is src and key[0] is not None and self._key == key:
            return self._value
        x = src.detach().reshape(-1, c_in).float()
        value = (x.shape[0], (x * x).sum(0), x.T @ x if gram else None)
        self._src, self._key, self._value = src, key, value
        return value

    def clear(self) -> None:
        self._src = self._key = self._value = None


def _version(t: Tensor) -> Optional[int]:
    """The in-place version counter of ``t`` (None for inference-mode tensors, which have none)."""
    try:
        return t._version
    except RuntimeError:
        return None


class InputHook:
    """Forward hook on a module: accumulates the statistics of its first input, flattened to C_in.
    Hooks given one ``SharedInputs`` compute the statistics of an input they share only once."""

    def __init__(self, module: nn.Module, c_in: int, gram: bool, shared: SharedInputs,
                 on_read: Optional[Callable[[], None]] = None) -> None:
        self.c_in, self.want_gram, self.shared, self.on_read = c_in, gram, shared, on_read
        self.stats: Optional[TargetStats] = None
        self.handle = module.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, out: object) -> None:
        if self.on_read is not None:
            self.on_read()
        src = args[0] if args else next(v for v in kwargs.values() if isinstance(v, Tensor))
        if src.numel() == 0:
            return
        tokens, sq, gram = self.shared.contribution(src, self.c_in, self.want_gram)
        if self.stats is None:
            z = torch.zeros(self.c_in, device=sq.device)
            g = torch.zeros(self.c_in, self.c_in, device=sq.device) if self.want_gram else None
            self.stats = TargetStats(z, None, g)
        st = self.stats
        st.sq += sq
        if st.gram is not None:
            st.gram += gram
        st.ncalls += 1
        st.ntokens += tokens

    def result(self, device: torch.device) -> TargetStats:
        if self.stats is None:   # never reached by a token
            z = torch.zeros(self.c_in, device=device)
            return TargetStats(z, None, torch.zeros(self.c_in, self.c_in, device=device)
                               if self.want_gram else None)
        return self.stats

    def remove(self) -> None:
        self.handle.remove()
        self.shared.clear()


def input_hooks(targets: list, gram: bool, on_read: Optional[Callable[[], None]] = None) -> dict[str, InputHook]:
    """An ``InputHook`` per non-expert target, sharing the statistics of inputs they have in common
    (``on_read``: called each time one of them sees an input)."""
    shared = SharedInputs()
    return {t.name: InputHook(t.module, t.weight.shape[1], gram, shared, on_read)
            for t in targets if t.kind != "expert"}
