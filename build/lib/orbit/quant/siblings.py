"""Sibling QuantLinears (q/k/v, gate/up) that read the same input, run as one decode GEMV.

A batch-1 decode step of a 1-2B model is launch-bound: Qwen3-1.7B has 7 linears per layer of
1-6 MB each, and a GEMV of a few MB costs several microseconds of fixed latency on an H100
whatever its size (docs/benchmarks.md). Projections that read the same input can be one
launch over their stacked weights: q/k/v as one [q+k+v, in] GEMV, gate/up as one [2I, in].

The module layout does not change (quantization, adapters and PEFT keys are swaps on the
separate q_proj/k_proj/v_proj names). Instead `fuse_siblings` re-homes each group's packed
buffers in one stacked tensor per buffer name and gives every member row-slice *views* of
it: no weight is held twice. When the first member of a group is called in an engine
forward (fast mode, inference mode, a CUDA tensor; for the quantized formats decode-sized
inputs of M <= 4 rows and inputs from the rows where fast mode dequantizes + runs cuBLAS,
`linear.sibling_serves`; any M for BF16, whose group is one cuBLAS GEMM), it computes the
whole group's output in one `qmm` call and keeps the other members' slices, keyed by the
input tensor object; each of them then returns its slice when called with that same tensor
(an adapter wrapper passes its input through to `.base`, so LoRA-wrapped members still hit).
Anything else — another input, exact mode, autograd, a member whose buffers were replaced or
moved — computes alone.

Formats: every one whose buffers stack along the output rows (int4, int8, fp8 with whole
128-row blocks, mxfp4, bf16); a per-tensor scalar (NVFP4's global scale) must be equal in
every member, else that group is left alone.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch import Tensor, nn

from orbit.kernels import dispatch
from orbit.quant.linear import QuantLinear
from orbit.quant.qweight import QuantizedWeight

ModT = TypeVar("ModT", bound=nn.Module)
# (parent attribute names) that read one input in the model's forward (orbit.models.transformer).
SIBLING_SETS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


@dataclass
class _Pending:
    x: Tensor  # the input the outputs were computed for (held, so its id cannot be reused)
    outputs: dict[int, Tensor] = field(default_factory=dict)  # member index -> [M, out_i]


class MemberGroup:
    """Modules that read one input and are computed together: the first member's call computes
    every member's output (`_compute`) and keeps the others', keyed by the input tensor; each
    of them then returns its output when called with that same tensor. A later member that
    finds outputs waiting for a *different* input means the members do not read one tensor
    here (an OFT adapter rotates each input): the group turns itself off for good rather than
    compute the others' outputs in vain at every step. The engine's warm-up runs before any
    graph capture, so no captured graph holds such a launch."""

    def __init__(self, members: list) -> None:
        self.members = members
        self._pending: _Pending | None = None
        self.enabled = True

    def output(self, member: nn.Module, x: Tensor, *args: Tensor) -> Tensor | None:
        """member's output for x, or None where the group cannot serve (the caller then
        computes alone)."""
        if not self.enabled:
            return None
        i = self.members.index(member)
        p = self._pending
        if p is not None and p.x is x and i in p.outputs:
            y = p.outputs.pop(i)
            if not p.outputs:
                self._pending = None
            return y
        if i != 0:
            if p is not None:
                self.enabled, self._pending = False, None
            return None
        outs = self._compute(x, *args)
        if outs is None:
            return None
        if len(outs) > 1:
            self._pending = _Pending(x, {j: outs[j] for j in range(1, len(outs))})
        return outs[0]

    def _compute(self, x: Tensor, *args: Tensor) -> list[Tensor] | None:
        """Every member's output for x, or None (the first member then computes alone)."""
        raise NotImplementedError


class SiblingGroup(MemberGroup):
    """Stacked buffers of member QuantLinears and the one-launch forward over them."""

    def __init__(self, members: list[QuantLinear], stacked: dict[str, Tensor]) -> None:
        super().__init__(members)
        self.splits = [m.out_features for m in members]
        first = members[0]
        self.qweight: QuantizedWeight | None = QuantizedWeight(first.weight_format, (sum(self.splits), first.in_features),
                                       stacked, first.group_size)
        # Each member's row-slice view of every stacked (non-scalar) buffer: what fuse_siblings
        # installs as its buffers, and what `linked` expects to find there.
        total, start = sum(self.splits), 0
        self.views: list[dict[str, Tensor]] = []
        for out_f in self.splits:
            self.views.append({name: big[big.shape[0] * start // total:
                                         big.shape[0] * (start + out_f) // total]
                               for name, big in stacked.items() if not _per_tensor(big)})
            start += out_f

    def unlink(self) -> None:
        """Members compute alone from now on; the stacked tensors are released (members keep
        their views, which keep the storage alive only as long as they are used)."""
        for m in self.members:
            m._sibling = None
        self.qweight, self.views, self._pending, self.enabled = None, [], None, False

    def linked(self, member: QuantLinear) -> bool:
        """Whether every buffer of `member` is still its view into the stacked tensors (a
        merge, a reload or a device move replaces buffers; the group then stands aside)."""
        views = self.views[self.members.index(member)]
        return all(getattr(member, name) is view for name, view in views.items())

    def _compute(self, x: Tensor, *args: Tensor) -> list[Tensor] | None:
        """Every member's x2d @ W^T from one grouped launch (x2d = args[0], x as 2-D)."""
        if not all(self.linked(m) for m in self.members):
            self.unlink()
            return None
        y_all = dispatch.qmm(args[0], self.qweight, exact=False)  # [M, sum(out)]
        return list(torch.split(y_all, self.splits, dim=1))


def _per_tensor(t: Tensor) -> bool:
    """A per-tensor scale (NVFP4's global scale): shared, not stacked."""
    return t.dim() == 0 or t.numel() == 1


def _stack(members: list[QuantLinear]) -> dict[str, Tensor] | None:
    """One stacked tensor per buffer name, or None if the members cannot share them."""
    first = members[0]
    if any(m.weight_format != first.weight_format or m.group_size != first.group_size
           or m.in_features != first.in_features or m.act_quant is not None
           or m._tensor_names != first._tensor_names for m in members):
        return None
    total = sum(m.out_features for m in members)
    out: dict[str, Tensor] = {}
    for name in first._tensor_names:
        ts = [getattr(m, name) for m in members]
        if _per_tensor(ts[0]):  # a per-tensor scalar: must agree
            if not all(torch.equal(t, ts[0]) for t in ts):
                return None
            out[name] = ts[0]
            continue
        if any(t.shape[1:] != ts[0].shape[1:] or t.dtype != ts[0].dtype or t.device != ts[0].device
               for t in ts):
            return None
        # Rows per output feature must be the same in every member (fp8's 128-row scale
        # blocks stack only when every member has whole blocks).
        if any(t.shape[0] * total != m.out_features * sum(u.shape[0] for u in ts)
               for t, m in zip(ts, members)):
            return None
        out[name] = torch.cat(ts, dim=0)
    return out


def _base_quant_linear(module: nn.Module | None) -> QuantLinear | None:
    """The QuantLinear under any adapter wrappers (which keep the frozen layer as `.base`)."""
    while module is not None and not isinstance(module, QuantLinear):
        module = getattr(module, "base", None)
    return module


def sibling_sets(model: nn.Module,
                 pick: Callable[[nn.Module | None], ModT | None]) -> Iterator[list[ModT]]:
    """Each q/k/v and gate/up set (SIBLING_SETS) of `model`'s modules, as `pick` maps its
    members (e.g. to the QuantLinear under any adapter wrapper), where every member maps to
    something."""
    for parent in model.modules():
        for names in SIBLING_SETS:
            members = [pick(getattr(parent, n, None)) for n in names]
            if all(m is not None for m in members):
                yield members  # type: ignore[misc]


def link_sibling_sets(model: nn.Module, pick: Callable[[nn.Module | None], ModT | None],
                      attr: str, key: Callable[[ModT], Hashable],
                      make: Callable[[list[ModT]], object]) -> int:
    """For each sibling set of `pick`'s modules (sibling_sets) whose members all agree on
    `key` and none of which has `attr` set yet, set every member's `attr` to one
    `make(members)`; returns the number of sets linked. (The adapters' decode groups: LoRA,
    OFT.)"""
    linked = 0
    for members in sibling_sets(model, pick):
        if any(getattr(m, attr) is not None for m in members):
            continue
        if len({key(m) for m in members}) != 1:
            continue
        group = make(members)
        for m in members:
            setattr(m, attr, group)
        linked += 1
    return linked


def fuse_siblings(model: nn.Module) -> int:
    """Stack the buffers of each q/k/v and gate/up group of QuantLinears in `model` and link
    the members for the one-launch decode path. Returns the number of groups linked."""
    linked = 0
    for members in sibling_sets(model, _base_quant_linear):
        if any(m._sibling is not None for m in members):
            continue
        stacked = _stack(members)
        if stacked is None:
            continue
        group = SiblingGroup(members, stacked)
        for m, views in zip(members, group.views):
            for name, view in views.items():
                setattr(m, name, view)  # a registered buffer, now a view of the stack
            m.clear_cache()
            m._sibling = group
        linked += 1
    return linked


