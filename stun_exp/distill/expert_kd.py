"""Expert-wise knowledge distillation after pruning (MoE-Pruner, Xie et al. 2024; ``distill=expert_kd``).

    L = CE(student next-token) + lambda * sum_l sum_e MSE( E^T_{l,t(e)}(x), E^S_{l,e}(x) )

* teacher = the dense model (``teacher.build_teacher`` from ``ctx.dense_state``); student = the
  pruned ``ctx.model``, trained in place.
* x = the TEACHER's input to MoE layer l, on the tokens the TEACHER routes to expert t(e): every
  student expert gets a layer-local reconstruction target (our reading of the paper).
* Only routed-expert weights train (router, attention, shared experts, embeddings frozen).
* Masks stay fixed: entries that are zero when distillation starts get their gradient zeroed and
  are re-zeroed after every optimiser step, so no pruned weight is ever revived.
* Expert mapping (``ctx.info["expert_plan"]``): a kept expert (representative r) is matched to
  teacher expert r on r's routed tokens; a merged group (representative null) is matched, with
  ``merged_experts=members``, to each member m on m's routed tokens, or skipped with ``skip``.
  ``zero_output`` slots that were pruned are skipped; no plan = identity mapping.
* The paper's loss weights, data, steps and optimiser are NOT published: every
  default below is a placeholder for the toy, not a paper value. The training text is the
  calibration tokens (``ctx.calib``), re-batched with a seed; a separate corpus is future work.
* The model stays in eval mode (no dropout / router jitter) while gradients flow.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stun_exp.distill.teacher import build_teacher
from stun_exp.models.adapter import get_adapter

log = logging.getLogger("stun_exp")
Pairs = dict[int, list[tuple[int, list[int]]]]     # layer -> [(student expert, [teacher experts])]


def expert_pairs(plan: Any, layer: int, n_student: int, merged: str = "members",
                 pruned: Optional[list[int]] = None) -> list[tuple[int, list[int]]]:
    """Which teacher experts each student expert of ``layer`` is distilled from (see docstring)."""
    lp = None if plan is None else plan.layers.get(layer)
    if lp is None:
        return [(e, [e]) for e in range(n_student) if e not in (pruned or [])]
    out = []
    zero_output = getattr(plan, "removal", "slice_router") == "zero_output"
    for i, (group, rep) in enumerate(zip(lp.groups, lp.representatives)):
        if rep is not None:
            out.append((rep if zero_output else i, [rep]))
        elif merged == "members":
            out += [(m, [m]) for m in group] if zero_output else [(i, list(group))]
    return out


class ExpertKD:
    """``distill(ctx) -> dict`` with the loss before and after training."""

    def __init__(self, name: str = "expert_kd", steps: int = 50, lr: float = 1e-4,
                 lambda_mse: float = 1.0, batch_size: int = 4, seq_len: Optional[int] = None,
                 weight_decay: float = 0.0, max_grad_norm: Optional[float] = 1.0,
                 merged_experts: str = "members", eval_batches: int = 2, seed: int = 0, **_: Any) -> None:
        self.name, self.steps, self.lr, self.lam = name, steps, lr, lambda_mse
        self.batch_size, self.seq_len, self.weight_decay = batch_size, seq_len, weight_decay
        self.max_grad_norm, self.merged, self.eval_batches, self.seed = (max_grad_norm, merged_experts,
                                                                          eval_batches, seed)

    # ---- public -------------------------------------------------------------------------------
    def distill(self, ctx: Any) -> dict:
        if ctx.dense_state is None:
            raise RuntimeError("expert_kd needs ctx.dense_state (the runner keeps it when distill != none)")
        student, s_ad = ctx.model, ctx.adapter
        teacher = build_teacher(student, s_ad, ctx.dense_state, ctx.device)
        t_ad = get_adapter(teacher)
        plan = ctx.info.get("expert_plan")
        pairs = {l: expert_pairs(plan, l, s_ad.num_experts(l), self.merged, s_ad.pruned_experts(l))
                 for l in s_ad.moe_layers}
        params = self._trainable(student, s_ad)
        # pruning masks live on weight matrices (2-D, or fused 3-D); biases are never pruned
        masks = [(p.detach() == 0) if p.dim() >= 2 else torch.zeros_like(p, dtype=torch.bool) for p in params]
        data = self._batches(ctx.calib, ctx.device)
        evals = data[:self.eval_batches]
        before = self._evaluate(student, teacher, s_ad, t_ad, pairs, evals)
        self._train(student, teacher, s_ad, t_ad, pairs, params, masks, data)
        after = self._evaluate(student, teacher, s_ad, t_ad, pairs, evals)
        revived = sum(int((p.detach()[m] != 0).sum()) for p, m in zip(params, masks))
        del teacher
        return {"method": self.name, "steps": self.steps, "lr": self.lr, "lambda_mse": self.lam,
                "batch_size": self.batch_size, "seq_len": int(data.shape[-1]),
                "merged_experts": self.merged, "trainable_params": sum(p.numel() for p in params),
                "masked_entries": sum(int(m.sum()) for m in masks), "revived_entries": revived,
                "pairs": sum(len(v) for v in pairs.values()),
                "before": before, "after": after, "note": "hyper-parameters are placeholders, not paper values"}

    # ---- pieces -------------------------------------------------------------------------------
    @staticmethod
    def _trainable(model: nn.Module, adapter: Any) -> list[nn.Parameter]:
        """Routed-expert parameters only; everything else is frozen."""
        keep = {id(p) for l in adapter.moe_layers for p in adapter.experts(l).parameters()}
        params = []
        for p in model.parameters():
            p.requires_grad_(id(p) in keep)
            if id(p) in keep:
                params.append(p)
        return params

    def _batches(self, calib: Tensor, device: torch.device) -> Tensor:
        """[eval + steps, batch, seq] token ids drawn (seeded) from the calibration set."""
        seq = min(self.seq_len or calib.shape[1], calib.shape[1])
        g = torch.Generator().manual_seed(self.seed)
        n = max(self.steps, 1) + self.eval_batches
        idx = torch.randint(0, calib.shape[0], (n, self.batch_size), generator=g)
        return calib[idx][..., :seq].to(device)

    def _train(self, student: nn.Module, teacher: nn.Module, s_ad: Any, t_ad: Any, pairs: Pairs,
               params: list, masks: list, data: Tensor) -> None:
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        for step in range(self.steps):
            ids = data[self.eval_batches + step]
            ce, mse = self._loss(student, teacher, s_ad, t_ad, pairs, ids)
            opt.zero_grad(set_to_none=True)
            (ce + self.lam * mse).backward()
            with torch.no_grad():
                for p, m in zip(params, masks):
                    if p.grad is not None:
                        p.grad.masked_fill_(m, 0.0)
            if self.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
            opt.step()
            with torch.no_grad():
                for p, m in zip(params, masks):
                    p.masked_fill_(m, 0.0)
        for p in student.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def _evaluate(self, student, teacher, s_ad, t_ad, pairs, evals: Tensor) -> dict:
        ces, mses = [], []
        for ids in evals:
            ce, mse = self._loss(student, teacher, s_ad, t_ad, pairs, ids)
            ces.append(float(ce))
            mses.append(float(mse))
        ce, mse = sum(ces) / len(ces), sum(mses) / len(mses)
        return {"ce": ce, "expert_mse": mse, "loss": ce + self.lam * mse}

    def _loss(self, student, teacher, s_ad, t_ad, pairs: Pairs, ids: Tensor) -> tuple[Tensor, Tensor]:
        """Next-token CE of the student and the summed per-expert MSE on teacher-routed tokens."""
        targets = _teacher_targets(teacher, t_ad, pairs, ids)
        logits = student(input_ids=ids).logits
        ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
        mse = logits.new_zeros((), dtype=torch.float32)
        for (l, s), (x, y) in targets.items():
            out = s_ad.expert_output(l, s, s_ad.expert_hidden(l, s, x))
            mse = mse + F.mse_loss(out.float(), y.float())
        return ce, mse


@torch.no_grad()
def _teacher_targets(teacher: nn.Module, t_ad: Any, pairs: Pairs, ids: Tensor) -> dict:
    """(layer, student expert) -> (teacher MoE inputs of its tokens, teacher expert outputs)."""
    inputs: dict[int, Tensor] = {}
    hooks = [t_ad.moe_block(l).register_forward_pre_hook(
        lambda m, a, kw, l=l: inputs.__setitem__(l, (a[0] if a else next(iter(kw.values())))),
        with_kwargs=True) for l in pairs]
    try:
        teacher(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for l, lp in pairs.items():
        x = inputs[l].reshape(-1, inputs[l].shape[-1])
        routed, _ = t_ad.route(l, t_ad.router_logits(l, x))
        for s, teachers in lp:
            xs, ys = [], []
            for t in teachers:
                tok = torch.where((routed == t).any(-1))[0]
                if len(tok):
                    xs.append(x[tok])
                    ys.append(t_ad.expert_output(l, t, t_ad.expert_hidden(l, t, x[tok])))
            if xs:
                out[(l, s)] = (torch.cat(xs), torch.cat(ys))
    return out
