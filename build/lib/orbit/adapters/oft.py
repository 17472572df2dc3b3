"""OFT (OFTv2, input-centric) around any frozen base linear: y = base(x @ blockdiag(R)).

The base weight is never rotated or rewritten: the rotation is applied to the activations,
so the same quantized kernel runs with the adapter on or off. Parameterization follows PEFT
>= 0.18 (peft/tuners/oft/layer.py, `OFTRotationModule`): the trainable `oft_R` [n, b(b-1)/2]
fills the strict upper triangle of M in `triu_indices(b, b, 1)` order, Q = M - M^T, and
- Cayley-Neumann (default): R = I + 2Q + 2Q^2 + ... + 2Q^(k-2) + Q^(k-1), k = num_terms
  (PEFT's loop differs for k = 2 and 3; `neumann_coefficients` copies it);
- exact: R = (I - Q)(I + Q)^-1 (what PEFT's `linalg.solve(I + Q, I - Q, left=False)` gives).
Zero init gives R = I. With `block_share`, one block ([1, b(b-1)/2]) serves every input block.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from orbit.adapters.lora import base_device, base_features
from orbit.adapters.slots import SlottedAdapter
from orbit.kernels import dispatch
from orbit.kernels.oft_rotate import (
    SplitRotation,
    concat_splits,
    oft_rotate,
    oft_rotate_frozen,
    oft_rotate_group_frozen,
    split_rotation,
)
from orbit.quant import linear as qlinear
from orbit.quant.linear import QuantLinear
from orbit.quant.siblings import MemberGroup, link_sibling_sets


def skew_index(b: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Gather map of a b x b skew matrix from [0, vec]: (index [b*b] into 1 + b(b-1)/2, sign)."""
    rows, cols = torch.triu_indices(b, b, 1)
    pos = torch.zeros(b, b, dtype=torch.long)
    pos[rows, cols] = torch.arange(1, rows.numel() + 1)
    sign = torch.zeros(b, b)
    sign[rows, cols] = 1.0
    # Q = M - M^T: the lower triangle reads the mirrored upper entry with a minus sign.
    return (pos + pos.T).flatten().to(device), (sign - sign.T).flatten().to(device)


def skew_from_vec(vec: Tensor, b: int, index: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """[n, b(b-1)/2] -> skew-symmetric [n, b, b] (upper triangle in triu_indices order).

    A gather (backward: one index_add) instead of PEFT's index_put + transpose-subtract."""
    idx, sign = index if index is not None else skew_index(b, vec.device)
    padded = torch.cat([vec.new_zeros(vec.shape[0], 1), vec], dim=1)  # [n, 1 + E]
    return (padded[:, idx] * sign.to(vec.dtype)).view(vec.shape[0], b, b)


def neumann_coefficients(num_terms: int) -> list[float]:
    """Coefficients c_j of Q^j in PEFT's Cayley-Neumann series (`_cayley_batch`).

    num_terms k >= 4 gives I + 2Q + 2Q^2 + ... + 2Q^(k-2) + Q^(k-1). PEFT's loop has two edge
    cases reproduced here so files load identically: k = 2 gives I + 2Q, and k = 3 gives the
    same as k = 4 (I + 2Q + 2Q^2 + Q^3)."""
    if num_terms <= 1:
        return [1.0]
    if num_terms == 2:
        return [1.0, 2.0]
    return [1.0] + [2.0] * (max(num_terms, 4) - 2) + [1.0]


def cayley(q: Tensor, use_neumann: bool = True, num_terms: int = 5) -> Tensor:
    """Skew-symmetric [n, b, b] -> orthogonal (or Neumann-approximated) [n, b, b], PEFT's way.

    The Neumann polynomial is evaluated by Horner's rule, P <- c_j I + Q P, one batched
    baddbmm per power instead of PEFT's separate matmuls and adds: the same polynomial, with
    float rounding that differs at the 1e-7 level."""
    n, b, _ = q.shape
    eye = torch.eye(b, device=q.device, dtype=q.dtype).expand(n, b, b)
    if not use_neumann:
        # X (I + Q) = I - Q  ->  X = (I - Q)(I + Q)^-1
        return torch.linalg.solve(eye + q, eye - q, left=False)
    c = neumann_coefficients(num_terms)
    if len(c) == 1:
        return eye.clone()
    p = c[-2] * eye + c[-1] * q  # the two highest terms without a matmul
    for cj in reversed(c[:-2]):
        p = torch.baddbmm(eye, q, p, beta=cj)
    return p


# Without autograd, rotate with the cached kernel split of R (one launch per linear); False:
# the autograd path's split at every call (a benchmark's same-run baseline).
FROZEN_SPLIT = True
# Linked sibling sets (link_oft_groups) rotate in one launch; False: each member alone (a
# benchmark's same-run baseline, read at every call). H100, Qwen3-1.7B INT4, OFT block 32
# (session 27, `bench_engine.py --sections lora --adapter-kinds oft --knob
# orbit.adapters.oft.GROUP_ROTATIONS=False,True`): decode tok/s b1 553 -> 590 (+6.7%), b4 2000
# -> 2140 (+7.0%), b64 16120 -> 17161 (+6.5%); the engine's tokens and log-prob bits equal the
# lone rotations' (tests/gpu/test_engine_gpu.py -k rotation_groups).
GROUP_ROTATIONS = True
# And, fast mode at decode rows (members x rows <= SIBLING_MAX_M: batch 1 for q/k/v, 1-2 for
# gate/up), run the members' bases as one launch over their stacked weight with every
# member's rotated rows (OFTRotateGroup._stacked_base). Off: measured no faster (H100,
# session 27: b1 589.9 vs 590.1 tok/s off, b2 1105.7 vs 1105.8). (A
# same-run --knob comparison must list True first: with it off, the members' different
# inputs turn their base sibling group off for good.)
STACKED_BASE = False


class OFTLinear(SlottedAdapter):
    """Orthogonal block rotation of a frozen linear's input; `active_slot=None` is `base(x)`."""

    slot_names = ("oft_R",)

    def __init__(
        self,
        base: nn.Module,
        block_size: int = 0,
        r: int = 0,
        use_cayley_neumann: bool = True,
        num_terms: int = 5,
        block_share: bool = False,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        in_f, out_f = base_features(base)
        if (block_size > 0) == (r > 0):
            raise ValueError(f"OFT needs exactly one of block_size / r > 0, got {block_size=} {r=}")
        if block_size > 0:
            if in_f % block_size:
                raise ValueError(f"OFT block_size {block_size} does not divide in_features {in_f}")
            r = in_f // block_size
        else:
            if in_f % r:
                raise ValueError(f"OFT r={r} blocks do not divide in_features {in_f}")
            block_size = in_f // r
        if block_size < 2:
            raise ValueError(f"OFT block size must be >= 2, got {block_size}")
        if num_terms < 1:
            raise ValueError(f"num_cayley_neumann_terms must be >= 1, got {num_terms}")
        self.base = base
        self.in_features, self.out_features = in_f, out_f
        self.r, self.block_size, self.block_share = r, block_size, block_share
        self.use_cayley_neumann, self.num_terms = use_cayley_neumann, num_terms
        n_el = block_size * (block_size - 1) // 2
        n_rot = 1 if block_share else r
        device = base_device(base) if device is None else torch.device(device)
        q = torch.zeros(n_rot, n_el, dtype=dtype, device=device)
        self._init_slots({"oft_R": q})
        # Inference-time cache of R: (slot, data_ptr, slot_version, R, R's kernel splits by x
        # dtype). Valid while the slot is not written: an optimizer step, a stage or a write
        # into the flat buffer invalidates it.
        self._rot_cache: tuple[int, int, tuple[int, int], Tensor,
                               dict[torch.dtype, SplitRotation]] | None = None
        self._skew_index: tuple[Tensor, Tensor] | None = None
        # R of slot 0 built for all OFT modules at once by `build_step_rotations` at the start
        # of a grad-enabled forward: (oft_R version, data_ptr, R with its autograd graph).
        # The dict's "live" turns False once backward has gone through the batched R.
        self._step_rot: tuple[tuple[int, int], int, Tensor, dict] | None = None
        # The OFT linears of this one's sibling set (q/k/v, gate/up), rotated in one launch
        # without autograd (link_oft_groups); None: alone.
        self.rotate_group: OFTRotateGroup | None = None

    def slots_written(self) -> None:
        self._rot_cache = None
        self._step_rot = None

    def rotation(self, slot: int = 0) -> Tensor:
        """R blocks [n or 1, b, b] in float32 (float64 for a float64 adapter), differentiable
        in slot 0's oft_R. Computed above bf16 so the rotation stays orthogonal to ~1e-6."""
        vec = self.slot_tensor(slot, "oft_R")
        vec = vec.to(torch.promote_types(vec.dtype, torch.float32))
        q = skew_from_vec(vec, self.block_size, self.skew_index_on(vec.device))
        return cayley(q, self.use_cayley_neumann, self.num_terms)

    def skew_index_on(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """skew_index for this block size on `device`, cached. Built outside inference mode
        even when first asked for by a rollout: an inference tensor cannot be saved for
        backward, and a later training forward indexes with it."""
        if self._skew_index is None or self._skew_index[0].device != device:
            with torch.inference_mode(False):
                self._skew_index = skew_index(self.block_size, device)
        return self._skew_index

    def _cached_rotation(self, slot: int) -> Tensor:
        t = self.slot_tensor(slot, "oft_R")
        if torch.is_grad_enabled() and t.requires_grad:
            sr = self._step_rot
            if (
                sr is not None
                and sr[3]["live"]
                and sr[0] == self.slot_version(0, "oft_R")
                and sr[1] == t.data_ptr()
            ):
                return sr[2]
            return self.rotation(slot)
        key = (slot, t.data_ptr(), self.slot_version(slot, "oft_R"))
        if self._rot_cache is None or self._rot_cache[:3] != key:
            with torch.no_grad():
                self._rot_cache = (*key, self.rotation(slot), {})
        return self._rot_cache[3]

    def _frozen_split(self, slot: int, dtype: torch.dtype) -> SplitRotation:
        """The cached R of `slot` split for x of `dtype` (made once per adapter version: the
        decode steps then run one kernel per linear, not five)."""
        rot = self._cached_rotation(slot)
        splits = self._rot_cache[4]
        if dtype not in splits:
            splits[dtype] = split_rotation(rot, dtype)
        return splits[dtype]

    def graph_key(self) -> tuple:
        """What a captured CUDA graph depends on (see rollout/engine.py): the active slot and
        its version. R is derived from the slot in Python (cached outside the graph), so new
        slot values need a new capture."""
        slot = self.active_slot
        return (slot,) if slot is None else (slot, self.slot_version(slot, "oft_R"))

    def forward(self, x: Tensor) -> Tensor:
        if self.active_slot is None:
            return self.base(x)
        slot = self.active_slot
        if self.rotate_group is not None:
            out = self.rotate_group.output(self, x)
            if out is not None:
                return out
        if not _frozen_path(self, x):
            rot = self._cached_rotation(slot)  # [n or 1, b, b]
            return self.base(oft_rotate(x, rot))
        # no autograd here (rollout, evaluation): R and its kernel split come from the cache
        return self.base(oft_rotate_frozen(x, self._frozen_split(slot, x.dtype)))

    def block_diag(self, slot: int = 0) -> Tensor:
        """The full [in, in] rotation in float32 (for merging and tests only)."""
        rot = self.rotation(slot).detach()
        if self.block_share:
            rot = rot.expand(self.r, -1, -1)
        return torch.block_diag(*rot.unbind(0))

    def extra_repr(self) -> str:
        return (
            f"block_size={self.block_size}, r={self.r}, share={self.block_share}, "
            f"neumann={self.use_cayley_neumann}, terms={self.num_terms}, active_slot={self.active_slot}"
        )


def _frozen_path(m: OFTLinear, x: Tensor) -> bool:
    """Whether m's forward of x takes the no-autograd rotation (the cached split)."""
    slot = m.active_slot
    return slot is not None and FROZEN_SPLIT and not (torch.is_grad_enabled() and (
        x.requires_grad or m.slot_tensor(slot, "oft_R").requires_grad))


class OFTRotateGroup(MemberGroup):
    """OFT linears of one sibling set (q/k/v, gate/up) read one input; without autograd their
    rotations of it are one kernel launch (each member's x R_g, bit for bit what it would
    compute alone) instead of one per member. The first member's call rotates for all, runs
    every member's base on its rotated input (or, STACKED_BASE, all bases in one launch) and
    keeps the others' outputs, keyed by the input tensor (MemberGroup); a call that cannot
    take it (autograd, members on other slots or block shapes) leaves each member alone."""

    def __init__(self, members: list[OFTLinear]) -> None:
        super().__init__(members)
        # (the members' split objects: the key, held so their ids stay theirs; the stack)
        self._stack: tuple[tuple[SplitRotation, ...], SplitRotation] | None = None

    def _compute(self, x: Tensor, *args: Tensor) -> list[Tensor] | None:
        first = self.members[0]
        slot = first.active_slot
        if not GROUP_ROTATIONS or not all(m.active_slot == slot and _frozen_path(m, x)
                                          for m in self.members):
            return None
        splits = tuple(m._frozen_split(slot, x.dtype) for m in self.members)
        if self._stack is None or any(a is not b for a, b in zip(self._stack[0], splits)):
            self._stack = (splits, concat_splits(list(splits)))
        rotated = oft_rotate_group_frozen(x, self._stack[1], len(self.members))
        outs = self._stacked_base(rotated) if STACKED_BASE else None
        if outs is None:
            outs = [m.base(r) for m, r in zip(self.members, rotated.unbind(0))]
        return outs

    def _stacked_base(self, rotated: Tensor) -> list[Tensor] | None:
        """Every member's base output from one launch over the members' stacked weight (their
        base sibling group's), fed every member's rotated rows: [G M, in] @ W_stack^T, of
        which member g keeps its rows and columns. G times the rows, but at decode rows the
        weight bytes are the cost, and it is one launch, not G. None where the bases are not
        one fused quantized sibling group serving these rows (fast mode, inference mode) or
        the rows pass SIBLING_MAX_M."""
        bases = [m.base for m in self.members]
        if not all(isinstance(b, QuantLinear) for b in bases):
            return None
        rows = rotated.reshape(-1, rotated.shape[-1])  # [G M, in], member-major
        if rows.shape[0] > qlinear.SIBLING_MAX_M:  # (read at each call: a knob)
            return None
        group = bases[0]._fused_group(bases, rows)
        if group is None or group.qweight is None:
            return None
        y_all = dispatch.qmm(rows, group.qweight, exact=False)  # [G M, sum(out)]
        m_rows, lead = rows.shape[0] // len(bases), rotated.shape[1:-1]
        # member g: its rows of its columns (the column split is the sibling group's)
        return [y[g * m_rows:(g + 1) * m_rows].reshape(*lead, y.shape[1])
                for g, y in enumerate(torch.split(y_all, group.splits, dim=1))]


def link_oft_groups(model: nn.Module) -> int:
    """Link each q/k/v and gate/up set of OFT linears in `model` (equal input width, block
    size and sharing) into an OFTRotateGroup; returns the number linked. Linked sets are left
    as they are."""
    return link_sibling_sets(model, lambda m: m if isinstance(m, OFTLinear) else None,
                             "rotate_group", lambda m: (m.in_features, m.block_size, m.block_share),
                             OFTRotateGroup)


def unlink_oft_groups(model: nn.Module) -> None:
    """Every OFT linear rotates its input alone again."""
    for m in model.modules():
        if isinstance(m, OFTLinear):
            m.rotate_group = None


def build_step_rotations(modules: list[OFTLinear]) -> None:
    """Build slot-0 R of many OFT modules in one batched computation per (b, Neumann, k).

    Per module, R costs ~7 small kernels; for Qwen3-4B's 252 linears that is ~1800 launches per
    forward and as many in backward. Here: one cat, one gather, k-2 baddbmm, one split (whose
    backward is one cat, not a zero-filled buffer per slice). Each module then uses its slice
    while its `oft_R` is unchanged (version counter) and backward has not yet gone through R,
    which includes activation-checkpoint recomputation: it sees the very same R.
    """
    groups: dict[tuple[int, bool, int], list[OFTLinear]] = {}
    for m in modules:
        if m.oft_R.requires_grad:
            groups.setdefault((m.block_size, m.use_cayley_neumann, m.num_terms), []).append(m)
    for (b, neumann, terms), mods in groups.items():
        vecs = [m.oft_R for m in mods]
        flat = torch.cat(vecs, dim=0)  # [sum n_rot, b(b-1)/2]
        flat = flat.to(torch.promote_types(flat.dtype, torch.float32))
        first = mods[0]
        rot = cayley(skew_from_vec(flat, b, first.skew_index_on(flat.device)), neumann,
                     terms)  # [sum n_rot, b, b]
        # Once backward has passed through R its graph is freed: a later forward that skips
        # the root's pre-hook (e.g. `model.forward(...)` directly) must rebuild R itself.
        state = {"live": True}
        rot.register_hook(lambda grad, state=state: state.update(live=False))
        for m, v, r in zip(mods, vecs, rot.split([v.shape[0] for v in vecs])):
            m._step_rot = (m.slot_version(0, "oft_R"), v.data_ptr(), r, state)
