"""LoRA wrappers that read one input (q/k/v, gate/up) run their adapters as one decode group.

`link_lora_decode(model)` links every LoRALinear of the model into a `LoRADecodeGroup`: the
members of each sibling set (orbit.quant.siblings.SIBLING_SETS) together, every other LoRA
linear alone. When the first member of a group is called in an engine forward (inference
mode, a CUDA input of any number of rows: decode steps, rollout batches, prefill chunks, an
adapter slot active, the fast path's conditions below), it
computes every member's base output (the base sibling group makes that one GEMV), then the
whole group's adapter delta in two launches
(orbit/kernels/lora_decode.py) added in place, and keeps the other members' outputs, keyed by
the input tensor; each of them then returns its output when called with that same tensor.
Where the base output is one fused quantized launch (the decode GEMV or the `tl.dot` loop of
the INT4/INT8/FP8/FP4 bases; `LoRADecodeGroup.fold_plan`), the delta is added in that launch's
store instead (orbit/kernels/lora_epilogue.py): the shrink, then the base launch(es) with the
expand-add folded in, one launch per group fewer than with the separate expand-add. The plane
and FP8 decode GEMVs (batch-1 steps of INT4/FP4/FP8 bases) and the `tl.dot` loop (5-1023
rows) compute h in their own grid too, so there a group is its base launches alone: the
adapter adds no launch to the step.
Everything else (trainer forwards with or without grad, exact mode's batch-invariant LoRA,
dropout in training mode, the CPU) runs the plain `LoRALinear.forward`: four launches per
adapted linear (x A^T, h B^T, the scale, the add). At rollout batches that cost what the
grouped pair saves: 2.2-2.4 ms per Qwen3-1.7B step at batch 64-256 (docs/benchmarks.md,
"Session 25").

The engine links on construction (`Engine(fuse_lora=None)`: on CUDA outside exact mode), after
the adapters were injected. Linking changes no tensor: the slot tensors are read at each call,
so staging a new adapter into a slot (or switching slots) needs no relinking, and CUDA graphs
captured through a group replay its launches on the slot's current values.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from orbit.adapters.lora import LoRALinear
from orbit.kernels import dispatch
from orbit.kernels import lora_decode as kernels
from orbit.kernels.lora_epilogue import LoRAEpilogue
from orbit.kernels.matmul_exact import interpreting
from orbit.quant.linear import QuantLinear, sibling_serves
from orbit.quant.qweight import QuantizedWeight
from orbit.quant.siblings import MemberGroup, link_sibling_sets

# Rows a group serves at most (None: any). A knob for same-run comparisons against the plain
# forward past a row count (bench_engine.py --knob orbit.adapters.lora_decode.MAX_ROWS=63,None:
# the pre-session-25 limit for INT4, dequantize + cuBLAS bases then ran the plain forward).
MAX_ROWS: int | None = None
# Per base format, the rows (first, last) where a group does not serve and the plain forward
# runs instead. INT4 at 17-63 rows: there the base runs the rules' `tl.dot` tile (the H100
# route table tunes 1-16 and 64+), whose LoRA epilogue made the group slower than the plain
# forward. H100, Qwen3-1.7B INT4, LoRA r16 on every linear (session 27, `bench_engine.py
# --sections lora --knob orbit.adapters.lora_decode.MAX_ROWS=None,16`, i.e. this rule):
# decode tok/s b24 3795 -> 4854 (+28%), b32 5008 -> 6358 (+27%), b40 5891 -> 7250 (+23%), b48
# 7000 -> 8597 (+23%); at b16 and b64 the group wins (b64: 16928 against 11896 with the cap at
# 63; NVFP4 b32 too: 8278 against 5762), so only INT4 and only these rows. The rule's own code
# (session 28, H100, `--knob "orbit.adapters.lora_decode.PLAIN_ROWS={},{'int4':(17,63)}"`):
# b24 3786 -> 4818, b32 4993 -> 6344, b48 6985 -> 8591; adapter off unchanged.
PLAIN_ROWS: dict[str, tuple[int, int]] = {"int4": (17, 63)}


class LoRADecodeGroup(MemberGroup):
    """LoRALinear members that read the same input, adapted together: inside their base
    launches where those can take it, else in two launches after them. `fold`: add the deltas
    in the base launches' store where they can (fold_plan); `fold_shrink`: and let the base
    launch compute h itself where it can (the plane and FP8 decode GEMVs, the `tl.dot` loop).
    False keeps the separate launches (same-run comparisons: bench_engine.py --fuse-lora
    both)."""

    def __init__(self, members: list[LoRALinear], fold: bool = True,
                 fold_shrink: bool = True) -> None:
        super().__init__(members)
        self.fold = fold
        self.fold_shrink = fold_shrink

    def serves(self, x: Tensor) -> bool:
        """Whether this call can take the fused path (checked on the first member's call)."""
        first = self.members[0]
        slot = first.active_slot
        # Inference mode only (the engine's), as the base sibling groups (QuantLinear._grouped):
        # a trainer forward, with or without grad, runs the plain forward, so its no-grad
        # log-probs (alignment measurements, say) are those of its training forward.
        if (slot is None or not torch.is_inference_mode_enabled() or x.dim() != 2
                or x.stride(-1) != 1):
            return False
        if (not (x.is_cuda or interpreting()) or x.shape[0] < 1
                or (MAX_ROWS is not None and x.shape[0] > MAX_ROWS)):
            return False
        lo, hi = PLAIN_ROWS.get(getattr(first.base, "weight_format", ""), (1, 0))
        if lo <= x.shape[0] <= hi:
            return False
        for m in self.members:
            if (m.active_slot != slot or type(m) is not LoRALinear or m.r != first.r
                    or m.scale != first.scale or (m.training and not isinstance(m.dropout, nn.Identity))
                    or m.slot_tensor(slot, "lora_A").dtype != x.dtype):
                return False
        return True

    def _compute(self, x: Tensor, *args: Tensor) -> list[Tensor] | None:
        """Every member's adapted output: the base launch(es) of `fold_plan` with the deltas
        (and h) inside, or else the base outputs (one grouped GEMV where the bases are
        siblings) and the group's deltas added in place in two launches."""
        if not self.serves(x):
            return None
        plan = self.fold_plan(x)
        epis = self._epilogues(x, plan) if plan is not None else None
        if epis is not None:  # each base launch adds its members' deltas in its store
            outs: list[Tensor] = []
            for (qw, lo, hi), lora in zip(plan, epis):
                y = dispatch.qmm_lora(x, qw, lora)
                outs += torch.split(y, [m.base.out_features for m in self.members[lo:hi]], dim=1)
            return outs
        ys = [m.base(x) for m in self.members]
        if any(y.dtype != x.dtype or y.stride(-1) != 1 for y in ys):
            return None  # (an fp32 base output, say): the plain forward handles the casts
        a, b = self._slot_tensors()
        kernels.lora_decode_triton(x, a, b, ys, self.members[0].scale)
        return ys

    def _slot_tensors(self) -> tuple[list[Tensor], list[Tensor]]:
        """The members' A and B in the active slot."""
        slot = self.members[0].active_slot
        return ([m.slot_tensor(slot, "lora_A") for m in self.members],
                [m.slot_tensor(slot, "lora_B") for m in self.members])

    def _epilogues(self, x: Tensor, plan: list[tuple[QuantizedWeight, int, int]]
                   ) -> list[LoRAEpilogue] | None:
        """One LoRA epilogue per launch of `plan` (None where B is not the kernels' contiguous
        activation-dtype tensor). Each launch computes its members' h in its own grid where
        it can (fold_shrink: the plane and FP8 decode GEMVs, the tl.dot loop); elsewhere one
        shrink launch first serves every member."""
        a, b = self._slot_tensors()
        if not all(bi.dtype == x.dtype and bi.is_contiguous() for bi in b):
            return None
        r = a[0].shape[0]
        inside = self.fold_shrink and all(dispatch.lora_shrink_in_kernel(x, qw)
                                          for qw, _, _ in plan)
        h = (torch.empty((x.shape[0], len(a) * r), dtype=x.dtype, device=x.device) if inside
             else kernels.lora_shrink(x, a))
        scale = self.members[0].scale
        return [LoRAEpilogue(h[:, lo * r:hi * r], tuple(b[lo:hi]), scale,
                             tuple(a[lo:hi]) if inside else None) for _, lo, hi in plan]

    def swiglu_output(self, gate: LoRALinear, up: nn.Module, x: Tensor) -> Tensor | None:
        """silu(gate(x)) * up(x), both adapted, from one launch: where this group is exactly
        (gate, up), serves x, and folds into one stacked nibble-plane decode GEMV (which then
        stores SwiGLU itself: dispatch.qmm_swiglu); else None."""
        if self.members != [gate, up] or not self.serves(x):
            return None
        plan = self.fold_plan(x)
        if plan is None or len(plan) != 1 or not dispatch.swiglu_foldable(x, plan[0][0],
                                                                          lora=True):
            return None
        epis = self._epilogues(x, plan)
        return dispatch.qmm_swiglu(x, plan[0][0], epis[0]) if epis is not None else None

    def chain_plan(self, gate: LoRALinear, up: nn.Module, x: Tensor, down_group: MemberGroup,
                   hidden: Tensor) -> tuple[QuantizedWeight, QuantizedWeight, LoRAEpilogue,
                                            LoRAEpilogue] | None:
        """For one persistent MLP launch (orbit/kernels/gemv_chain.py) with every adapter
        inside: (stacked gate/up weight, down weight, their LoRA epilogues, each computing
        its h in the launch), where this group is exactly (gate, up) and serves x, the down
        layer's group (one member, the same slot) serves `hidden` (the SwiGLU output buffer,
        the down input), and both fold into one plane-GEMV launch; else None."""
        if (self.members != [gate, up] or not self.serves(x)
                or not isinstance(down_group, LoRADecodeGroup) or len(down_group.members) != 1
                or not down_group.serves(hidden)
                or down_group.members[0].active_slot != gate.active_slot):
            return None
        plans = self.fold_plan(x), down_group.fold_plan(hidden)
        if any(p is None or len(p) != 1 for p in plans):
            return None
        epis = self._epilogues(x, plans[0]), down_group._epilogues(hidden, plans[1])
        if any(e is None or e[0].a is None for e in epis):
            return None
        return plans[0][0][0], plans[1][0][0], epis[0][0], epis[1][0]

    def fold_plan(self, x: Tensor) -> list[tuple[QuantizedWeight, int, int]] | None:
        """The base launches that can add this group's deltas in their store, as (weight,
        first member, end member): one launch over the sibling group's stacked weight where
        the bases would run grouped (QuantLinear._grouped: inference mode, few rows), else
        one per member; None where some base runs otherwise (then: the base launches, the
        shrink and a separate expand-add), i.e. where a base's output is not one fused
        quantized launch that nothing else touches (QuantLinear.fused_output: a bias, say, is
        added after the base output, before the delta), or where folding would undo a base
        grouping (a lone adapted member of a sibling group that serves these rows)."""
        bases = [m.base for m in self.members]
        if not self.fold or not all(
                isinstance(q, QuantLinear) and q.fused_output(x.device) for q in bases):
            return None
        group = bases[0]._sibling
        grouped = (group is not None and group.enabled
                   and sibling_serves(bases[0].weight_format, x.shape[0]))
        if grouped and len(bases) == 1:
            return None
        if grouped and group.members == bases and all(group.linked(q) for q in bases):
            qw = group.qweight
            ok = qw is not None and dispatch.lora_foldable(x, qw, len(bases))
            return [(qw, 0, len(bases))] if ok else None
        plan = [(q.quantized_weight(), i, i + 1) for i, q in enumerate(bases)]
        return plan if all(dispatch.lora_foldable(x, qw) for qw, _, _ in plan) else None


def _lora(module: nn.Module | None) -> LoRALinear | None:
    return module if type(module) is LoRALinear else None


def link_lora_decode(model: nn.Module, fold: bool = True, fold_shrink: bool = True) -> int:
    """Link the model's LoRALinear modules into decode groups (see the module docstring);
    returns the number of groups. Modules already linked are left as they are. `fold`,
    `fold_shrink`: see LoRADecodeGroup."""
    groups = link_sibling_sets(model, _lora, "decode_group", lambda m: (m.in_features, m.r),
                               lambda members: LoRADecodeGroup(members, fold, fold_shrink))
    for m in model.modules():
        if type(m) is LoRALinear and m.decode_group is None:
            m.decode_group = LoRADecodeGroup([m], fold, fold_shrink)
            groups += 1
    return groups


def unlink_lora_decode(model: nn.Module) -> None:
    """Every LoRALinear runs the plain forward again."""
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.decode_group = None
