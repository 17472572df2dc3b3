"""Qwen3-MoE sparse MLP block with separate per-expert linears and routing record/replay.

Each expert is an ordinary `MLP` whose `gate_proj/up_proj/down_proj` are `nn.Linear`
modules named `mlp.experts.{j}.*` as in the original Qwen3-MoE checkpoints, so quantization
and adapters swap them like any other linear. Compute is grouped: tokens are sorted by chosen
expert and each expert runs once on its contiguous slice. The reference is a loop over
experts; on CUDA, when every expert's gate/up/down are plain `QuantLinear`s of one format (no
adapters, no bias, no W8A8 or exact mode), one grouped dequantize-GEMM launch per projection
runs all experts (`orbit.kernels.moe_gemm`, input gradient included): 1.78x the loop's
training step on a Qwen3-30B-A3B shape (H100, docs/benchmarks.md). That path stacks each
projection's expert tensors once per device into [E, ...] tensors and then points every
expert's buffers at its slice of the stack, so the weights are held once, not twice. It is
on by default; `set_fused_experts(model, False)` (trainer `--no-fused-moe`) keeps the loop.

Routing replay: RL trains on the rollout's tokens, but a slightly different adapter or a
batch-variant kernel can flip a top-k choice between rollout and training, which changes the
log-prob discontinuously. `MoERouting` records the experts each token chose in one forward
(the engine) and replays them in another (the trainer); the mixing weights are still
recomputed from the current router logits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from orbit.kernels.moe_gemm import StackedQuantWeight
    from orbit.models.config import ModelConfig


class MoERouting:
    """Per-layer expert ids [T, k] (int64). mode "record" stores them, "replay" reuses them.

    Keyed by layer index, so activation checkpointing (which re-runs a layer's forward) neither
    duplicates a record nor consumes a replay twice.
    """

    def __init__(self, mode: str = "record", expert_ids: dict[int, Tensor] | None = None) -> None:
        if mode not in ("record", "replay"):
            raise ValueError(f"MoERouting mode must be 'record' or 'replay', got {mode!r}")
        self.mode = mode
        self.expert_ids: dict[int, Tensor] = dict(expert_ids or {})

    def route(self, layer: int, probs: Tensor, k: int) -> Tensor:
        """probs [T, E] float32 -> expert ids [T, k]."""
        if self.mode == "replay":
            if layer not in self.expert_ids:
                raise ValueError(f"MoE routing replay has no expert ids for layer {layer}")
            ids = self.expert_ids[layer].to(probs.device)
            if ids.shape != (probs.shape[0], k):
                raise ValueError(
                    f"MoE routing replay for layer {layer}: expert ids of shape {tuple(ids.shape)}, "
                    f"expected {(probs.shape[0], k)}"
                )
            return ids
        ids = torch.topk(probs, k, dim=-1).indices
        self.expert_ids[layer] = ids.detach()
        return ids

    @classmethod
    def concat(cls, parts: list[MoERouting]) -> MoERouting:
        """Join the records of several forwards along the token axis (e.g. prefill + decodes)."""
        layers = parts[0].expert_ids.keys()
        return cls("replay", {i: torch.cat([p.expert_ids[i] for p in parts]) for i in layers})

    def select(self, index: Tensor) -> MoERouting:
        """Records for the tokens at `index` [T'] (to reorder into the trainer's packing)."""
        return MoERouting("replay", {i: ids[index] for i, ids in self.expert_ids.items()})


def _drop_fused_cache(module: SparseMoeBlock, incompatible_keys=None) -> None:
    """load_state_dict post hook: new expert weights invalidate the stacked copy."""
    module._fused_cache = None


def set_fused_experts(model: nn.Module, enabled: bool) -> int:
    """Turn the grouped-kernel expert path on or off for every SparseMoeBlock of `model`;
    returns how many blocks were set."""
    blocks = [m for m in model.modules() if isinstance(m, SparseMoeBlock)]
    for b in blocks:
        b.fused_experts = enabled
    return len(blocks)


def share_stacked_weights(experts: nn.ModuleList, proj: str, stacked: StackedQuantWeight) -> None:
    """Point every `experts[e].<proj>` buffer at slice e of `stacked` (same values), so the
    per-expert loop and the grouped kernel read one copy of the weights."""
    for e, ex in enumerate(experts):
        layer = getattr(ex, proj)
        for name, t in stacked.tensors.items():
            setattr(layer, name, t[e])


class SparseMoeBlock(nn.Module):
    """Router `gate` [E, D] + `experts.{j}` SwiGLU MLPs; top-k softmax routing."""

    fused_experts = True  # per module: set_fused_experts(model, False) keeps the reference loop

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        from orbit.models.transformer import MLP  # one MLP definition for dense and experts

        self.layer_idx = layer_idx
        self.num_experts, self.top_k = config.num_experts, config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(
            MLP(config.hidden_size, config.moe_intermediate_size) for _ in range(config.num_experts)
        )
        self._fused_cache: tuple | None = None  # (key, stacked gate/up/down) of the fused path
        self.register_load_state_dict_post_hook(_drop_fused_cache)

    def _apply(self, fn, recurse: bool = True):
        self._fused_cache = None  # buffers may move or change: restack on next use
        return super()._apply(fn, recurse)

    def _fused_weights(self, x: Tensor) -> tuple | None:
        """Stacked (gate, up, down) weights for the grouped kernel, or None for the loop."""
        if not (self.fused_experts and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)):
            return None
        from orbit.kernels._triton import HAS_TRITON
        from orbit.quant.linear import QuantLinear

        if not HAS_TRITON:
            return None
        layers = []
        for ex in self.experts:
            for p in (ex.gate_proj, ex.up_proj, ex.down_proj):
                if type(p) is not QuantLinear or p.exact or p.act_quant is not None:
                    return None  # wrapped by an adapter, unquantized, or a special mode
                layers.append(p)
        key = (x.device, tuple(map(id, layers)))
        if self._fused_cache is not None and self._fused_cache[0] == key:
            return self._fused_cache[1]
        from orbit.kernels.moe_gemm import stack_expert_weights

        projs = ("gate_proj", "up_proj", "down_proj")
        stacks = tuple(stack_expert_weights(self.experts, p) for p in projs)
        if any(s is None or s.device != x.device for s in stacks):
            stacks = None
        else:  # experts now read their slice of the stack: the old per-expert copies are freed
            for proj, st in zip(projs, stacks):
                share_stacked_weights(self.experts, proj, st)
        self._fused_cache = (key, stacks)
        return stacks

    def forward(self, x: Tensor, routing: MoERouting | None = None) -> Tensor:
        """x [T, D] -> [T, D]."""
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float32)  # [T, E]
        if routing is not None:
            ids = routing.route(self.layer_idx, probs, self.top_k)
        else:
            ids = torch.topk(probs, self.top_k, dim=-1).indices  # [T, k]
        w = probs.gather(1, ids)  # [T, k]
        if self.norm_topk_prob:
            w = w / w.sum(dim=-1, keepdim=True)
        w = w.to(x.dtype)
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            return self._dense(x, ids, w)
        return self._grouped(x, ids, w)

    def _grouped(self, x: Tensor, ids: Tensor, w: Tensor) -> Tensor:
        flat = ids.reshape(-1)  # [T*k]
        order = torch.argsort(flat, stable=True)
        tok = order // self.top_k  # token of each sorted (token, choice) pair
        stacks = self._fused_weights(x)
        if stacks is not None:
            from orbit.kernels.moe_gemm import grouped_qmm_autograd

            # Expert e owns sorted rows offs[e]:offs[e+1]; searchsorted needs no host sync.
            arange = torch.arange(self.num_experts + 1, device=flat.device, dtype=flat.dtype)
            offs = torch.searchsorted(flat[order].contiguous(), arange)
            xs = x[tok].contiguous()
            gate = grouped_qmm_autograd(xs, offs, stacks[0])
            up = grouped_qmm_autograd(xs, offs, stacks[1])
            ys = grouped_qmm_autograd((F.silu(gate) * up).contiguous(), offs, stacks[2])
        else:
            counts = torch.bincount(flat, minlength=self.num_experts).tolist()
            xs = x[tok]  # [T*k, D] grouped by expert
            ys = torch.empty_like(xs)
            start = 0
            for e, n in enumerate(counts):
                if n:
                    ys[start : start + n] = self.experts[e](xs[start : start + n])
                    start += n
        ys = ys * w.reshape(-1)[order, None]
        return torch.zeros_like(x).index_add_(0, tok, ys)

    def _dense(self, x: Tensor, ids: Tensor, w: Tensor) -> Tensor:
        """Every expert on every token, masked: no host sync, so CUDA graphs can capture it."""
        coef = torch.zeros(x.shape[0], self.num_experts, dtype=x.dtype, device=x.device)
        coef.scatter_(1, ids, w)  # [T, E]
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            out = out + expert(x) * coef[:, e : e + 1]
        return out
