"""The decoder-only transformer shared by trainer and engine: Llama/SmolLM2, Qwen3, Qwen3-MoE.

Module names follow transformers exactly (`model.layers.{i}.self_attn.q_proj`, ...) so PEFT
adapter keys and HF checkpoint keys line up without renaming. Every projection is a separate
`nn.Linear` (never fused): quantization and adapters are module swaps on these names.

The forward works on a *packed* batch: `input_ids [T]`, `positions [T]` and an `AttnBatch`
(orbit.models.attention) that says how attention reads keys/values. Nothing here branches on
precision or adapter type. Without autograd on CUDA (the engine, log-prob passes) the residual
adds run inside the next norm's kernel and SwiGLU's silu * up is one kernel: fewer launches,
the same bits as the autograd forward, so exact mode's engine == trainer still holds.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from orbit.kernels.rmsnorm_exact import (
    RMSNormFunction,
    add_rmsnorm_triton,
    fused_rmsnorm_available,
    rmsnorm_torch,
)
from orbit.kernels.rope import (
    NormRopeFunction,
    fused_norm_rope_available,
    qk_norm_rope_kv,
    qk_norm_rope_kv_available,
)
from orbit.kernels.swiglu import silu_mul, silu_mul_available
from orbit.models.attention import AttnBatch
from orbit.models.config import ModelConfig
from orbit.models.moe import SparseMoeBlock


class RMSNorm(nn.Module):
    """HF-style RMSNorm: normalise in float32, cast back, then scale by the weight."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        if fused_rmsnorm_available(x):  # one Triton launch, same arithmetic (kernels/rmsnorm_exact)
            return RMSNormFunction.apply(x, self.weight, self.eps)
        return rmsnorm_torch(x, self.weight, self.eps)

    def add_forward(self, x: Tensor, delta: Tensor | None) -> tuple[Tensor, Tensor]:
        """(s, norm(s)) with s = x + delta (x itself when delta is None): the residual add and
        the norm that reads it in one launch where the fused kernel runs (no autograd), bit
        for bit the separate `x + delta` and `self(s)` (see add_rmsnorm_triton)."""
        if delta is None:
            return x, self(x)
        if fused_rmsnorm_available(x) and not _needs_grad(x, delta):
            return add_rmsnorm_triton(x, delta, self.weight, self.eps)
        s = x + delta
        return s, self(s)


def _needs_grad(*ts: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in ts)


def rope_inv_freq(config: ModelConfig) -> tuple[Tensor, float]:
    """(inv_freq [head_dim/2] float32, attention scaling) for the config's RoPE variant; the
    formulas are transformers' `modeling_rope_utils` ones, reproduced so results match."""
    dim, base = config.head_dim, config.rope_theta
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    sc = config.rope_scaling
    if sc is None:
        return inv, 1.0
    rtype = sc["rope_type"]
    if rtype == "linear":
        return inv / sc["factor"], 1.0
    if rtype == "llama3":
        factor, lo, hi = sc["factor"], sc.get("low_freq_factor", 1.0), sc.get("high_freq_factor", 4.0)
        old = sc["original_max_position_embeddings"]
        lo_wl, hi_wl = old / lo, old / hi
        wavelen = 2 * math.pi / inv
        inv_l = torch.where(wavelen > lo_wl, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
        medium = ~(wavelen < hi_wl) * ~(wavelen > lo_wl)
        return torch.where(medium, smoothed, inv_l), 1.0
    if rtype == "yarn":
        return _yarn_inv_freq(config)
    raise AssertionError(rtype)


def _yarn_inv_freq(config: ModelConfig) -> tuple[Tensor, float]:
    sc = config.rope_scaling or {}
    dim, base = config.head_dim, config.rope_theta
    orig = sc["original_max_position_embeddings"]
    factor = sc.get("factor") or config.max_position_embeddings / orig

    def mscale(s: float, m: float = 1.0) -> float:
        return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0

    att = sc.get("attention_factor")
    if att is None:
        m, m_all = sc.get("mscale"), sc.get("mscale_all_dim")
        att = float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else mscale(factor)
    beta_fast, beta_slow = sc.get("beta_fast") or 32, sc.get("beta_slow") or 1

    def corr_dim(rot: float) -> float:
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = corr_dim(beta_fast), corr_dim(beta_slow)
    if sc.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)
    extra_f = 1 - ramp
    inv = (1.0 / (factor * pos_freqs)) * (1 - extra_f) + (1.0 / pos_freqs) * extra_f
    return inv, att


class RotaryEmbedding(nn.Module):
    """cos/sin tables [max_positions, head_dim] (float32), indexed by token position."""

    def __init__(self, config: ModelConfig, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self.reset(device)

    def reset(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the tables, e.g. after a model built on the meta device is materialised."""
        inv, scale = rope_inv_freq(self.config)
        t = torch.arange(self.config.max_position_embeddings, dtype=torch.float32)
        freqs = t[:, None] * inv[None, :]  # [P, D/2]
        emb = torch.cat([freqs, freqs], dim=-1)  # [P, D]
        if device is not None and torch.device(device).type == "meta":
            self.cos, self.sin = emb.to("meta"), emb.to("meta")
            return
        self.cos = (emb.cos() * scale).to(device or "cpu")
        self.sin = (emb.sin() * scale).to(device or "cpu")

    def forward(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        return self.cos[positions].to(dtype), self.sin[positions].to(dtype)  # [T, D] each


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [T, H, D], cos/sin [T, D]."""
    return x * cos[:, None, :] + rotate_half(x) * sin[:, None, :]


def _norm_rope(x: Tensor, norm: RMSNorm | None, cos: Tensor, sin: Tensor) -> Tensor:
    """The optional per-head RMSNorm and RoPE of x [T, H, D] as one fused kernel."""
    if norm is None:
        return NormRopeFunction.apply(x, None, 0.0, cos, sin)
    return NormRopeFunction.apply(x, norm.weight, norm.eps, cos, sin)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        b = c.attention_bias
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=b)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=b)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=b)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=b)
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attn: AttnBatch) -> Tensor:
        return self.o_proj(self.core(x, cos, sin, attn))

    def core(self, x: Tensor | None, cos: Tensor, sin: Tensor, attn: AttnBatch,
             qkv: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:
        """Everything before o_proj: the attention output [T, heads * head_dim]. `qkv`: the
        projections of x already made (x then unused; DecoderLayer.forward_prenorm)."""
        if qkv is None:
            assert x is not None
            qkv = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        T = qkv[0].shape[0]
        q = qkv[0].view(T, self.num_heads, self.head_dim)  # [T, H, D]
        k = qkv[1].view(T, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        v = qkv[2].view(T, self.num_kv_heads, self.head_dim)
        fused = fused_norm_rope_available(q)
        dest = attn.kv_destination(self.layer_idx, T) if fused and not _needs_grad(q, k, v) else None
        qw = self.q_norm.weight if self.q_norm is not None else None
        kw = self.k_norm.weight if self.k_norm is not None else None
        if dest is not None and qk_norm_rope_kv_available(q, k, v, qw, kw, dest[0], dest[1]):
            eps = self.q_norm.eps if self.q_norm is not None else 0.0
            # A fast-mode decode step: all of it inside the attention launch (AttnBatch.
            # attend_rope). Else, a cached batch without autograd: q/k norm + RoPE and the
            # cache write of k and v in one launch (kernels/rope.py), the bits of the separate
            # launches below.
            o = attn.attend_rope(self.layer_idx, q, k, v, qw, kw, eps, cos, sin)
            if o is not None:
                return o.reshape(T, self.num_heads * self.head_dim)
            q = qk_norm_rope_kv(q, k, v, qw, kw, eps, cos, sin, *dest,
                                l2_prefetch=attn.l2_table(self.layer_idx, "rope", q))
            attn.kv_written(self.layer_idx)
        elif fused:  # one launch each for q and k (kernels/rope.py)
            q, k = _norm_rope(q, self.q_norm, cos, sin), _norm_rope(k, self.k_norm, cos, sin)
        else:
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = attn.attend(self.layer_idx, q, k, v)  # [T, H, D]
        return o.reshape(T, self.num_heads * self.head_dim)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.hidden(x))

    def hidden(self, x: Tensor) -> Tensor:
        """silu(gate(x)) * up(x), down_proj's input."""
        act = _fused_swiglu(self.gate_proj, self.up_proj, x)
        if act is not None:
            return act
        g, u = self.gate_proj(x), self.up_proj(x)
        if silu_mul_available(g, u) and not _needs_grad(g, u):
            return silu_mul(g, u)  # one launch, the same bits
        return F.silu(g) * u


def _fused_swiglu(gate: nn.Module, up: nn.Module, x: Tensor) -> Tensor | None:
    """silu(gate(x)) * up(x) from one launch where the gate layer offers it (`swiglu_with`:
    quantized gate/up siblings at decode sizes in the engine, LoRA-wrapped or not, whose GEMV
    stores SwiGLU itself, bit for bit the separate launches'), else None."""
    fn = getattr(gate, "swiglu_with", None)
    return fn(up, x) if fn is not None and not _needs_grad(x) else None


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = Attention(config, layer_idx)
        self.is_moe = config.is_moe_layer(layer_idx)
        self.mlp: nn.Module = (
            SparseMoeBlock(config, layer_idx)
            if self.is_moe
            else MLP(config.hidden_size, config.intermediate_size, config.mlp_bias)
        )
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, attn: AttnBatch) -> Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, attn)
        return h + self._mlp(self.post_attention_layernorm(h), attn)

    def _mlp(self, x: Tensor, attn: AttnBatch) -> Tensor:
        y = self._mlp_whole(x, attn)
        return y if y is not None else self.mlp(x)

    def _mlp_whole(self, x: Tensor, attn: AttnBatch) -> Tensor | None:
        """The MLP output where it does not end in a down_proj launch of its own (the MoE
        block; the dense MLP as one persistent launch, `attn.chain_mlp`); None: the dense
        MLP's hidden then down_proj, whose launch may take the next norm (forward_fused)."""
        if self.is_moe:
            return self.mlp(x, attn.routing)
        return _chain_mlp(self.mlp, x) if attn.chain_mlp else None

    def forward_fused(self, h: Tensor, x: Tensor, cos: Tensor, sin: Tensor, attn: AttnBatch,
                      next_norm: RMSNorm) -> tuple[Tensor, Tensor]:
        """No-autograd forward: from the residual stream h and x = input_layernorm(h), the
        layer's output h' and next_norm(h'). Each residual add runs with the norm that reads it
        (RMSNorm.add_forward), or, where `attn.fold_norm` and the linear before it can, inside
        that linear's launch (_linear_add_norm). Same arithmetic in the same order as
        `forward` followed by next_norm."""
        o = self.self_attn.core(x, cos, sin, attn)
        h, x = _linear_add_norm(self.self_attn.o_proj, o, h, self.post_attention_layernorm, attn)
        y = self._mlp_whole(x, attn)
        if y is not None:
            return next_norm.add_forward(h, y)
        return _linear_add_norm(self.mlp.down_proj, self.mlp.hidden(x), h, next_norm, attn)

    def forward_prenorm(self, h: Tensor, delta: Tensor | None, cos: Tensor, sin: Tensor,
                        attn: AttnBatch) -> tuple[Tensor, Tensor]:
        """No-autograd forward with the residual adds deferred into the GEMVs that read the
        normed rows (`attn.fold_norm == "prologue"`, orbit/kernels/norm_prologue.py): the
        layer's input is the residual h plus the previous layer's pending delta (None: h
        alone); returns (h', delta') with the layer's output h' + delta'. Each add + norm runs
        inside the q/k/v or gate/up GEMV where that layer offers it, else as the separate
        launch (RMSNorm.add_forward). Same arithmetic in the same order as forward_fused."""
        norm, post = self.input_layernorm, self.post_attention_layernorm
        qkv = x = None
        if delta is None:
            x = norm(h)
        else:
            out = _prenorm_qkv(self.self_attn, delta, h, norm)
            if out is not None:
                h, qkv = out
            else:
                h, x = norm.add_forward(h, delta)
        delta = self.self_attn.o_proj(self.self_attn.core(x, cos, sin, attn, qkv))
        if self.is_moe or attn.chain_mlp:
            h, x = post.add_forward(h, delta)
            return h, self._mlp(x, attn)
        folded = _prenorm_swiglu(self.mlp, delta, h, post)
        if folded is not None:
            h, act = folded
        else:
            h, x = post.add_forward(h, delta)
            act = self.mlp.hidden(x)
        return h, self.mlp.down_proj(act)


def _prenorm_qkv(attn_mod: Attention, delta: Tensor, residual: Tensor,
                 norm: RMSNorm) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]] | None:
    """(s, (q, k, v) of norm(s)) with s = residual + delta, from the one q/k/v launch where the
    q layer offers it (`prenorm_siblings_with`: the stacked q/k/v plane-GEMV decode forward, no
    adapter active; orbit/kernels/norm_prologue.py), else None."""
    fn = getattr(attn_mod.q_proj, "prenorm_siblings_with", None)
    if fn is None or _needs_grad(delta):
        return None
    out = fn([attn_mod.k_proj, attn_mod.v_proj], delta, residual, norm.weight, norm.eps)
    return None if out is None else (out[0], tuple(out[1]))


def _prenorm_swiglu(mlp: MLP, delta: Tensor, residual: Tensor,
                    norm: RMSNorm) -> tuple[Tensor, Tensor] | None:
    """(s, silu(gate(x)) * up(x)) with s = residual + delta and x = norm(s), from the one
    gate/up launch where the gate layer offers it (`swiglu_prenorm_with`), else None."""
    fn = getattr(mlp.gate_proj, "swiglu_prenorm_with", None)
    if fn is None or _needs_grad(delta):
        return None
    return fn(mlp.up_proj, delta, residual, norm.weight, norm.eps)


def _chain_mlp(mlp: MLP, x: Tensor) -> Tensor | None:
    """down(silu(gate(x)) * up(x)) from one persistent launch where the gate layer offers it
    (`mlp_chain_with`: quantized plane-format gate/up siblings and down at decode rows, no
    adapter active; orbit/kernels/gemv_chain.py), else None."""
    fn = getattr(mlp.gate_proj, "mlp_chain_with", None)
    return fn(mlp.up_proj, mlp.down_proj, x) if fn is not None and not _needs_grad(x) else None


def _linear_add_norm(linear: nn.Module, inp: Tensor, residual: Tensor, norm: RMSNorm,
                     attn: AttnBatch) -> tuple[Tensor, Tensor]:
    """(s, norm(s)) with s = residual + linear(inp): from the linear's own launch where it
    offers that (`add_norm_with`: a quantized base whose engine forward is the decode GEMV,
    orbit/kernels/norm_epilogue.py) and the batch asks for it, else the linear then one
    add + norm launch."""
    fn = getattr(linear, "add_norm_with", None) if attn.fold_norm in (True, "epilogue") else None
    out = fn(inp, residual, norm.weight, norm.eps) if fn is not None else None
    if out is not None:
        return out
    return norm.add_forward(residual, linear(inp))


class Model(nn.Module):
    """The `model.` prefix of HF checkpoints: embeddings, layers, final norm."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config, self.embed_tokens.weight.device)


class CausalLM(nn.Module):
    """`forward(input_ids[T], positions[T], attn) -> hidden[T, D]`; `logits(hidden) -> [T, V]`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # Recompute each layer in backward instead of storing its activations.
        self.gradient_checkpointing = False

    def forward(self, input_ids: Tensor, positions: Tensor, attn: AttnBatch) -> Tensor:
        if input_ids.dim() != 1 or positions.shape != input_ids.shape:
            raise ValueError(
                f"input_ids and positions must both be 1-D [T] (packed); got "
                f"{tuple(input_ids.shape)} and {tuple(positions.shape)}"
            )
        h = self.model.embed_tokens(input_ids)  # [T, D]
        cos, sin = self.model.rotary_emb(positions, h.dtype)
        ckpt = self.gradient_checkpointing and torch.is_grad_enabled()
        if not torch.is_grad_enabled() and fused_rmsnorm_available(h):
            # No autograd (the engine, log-prob passes): residual adds fused into the norms,
            # two launches per layer fewer, the same bits (DecoderLayer.forward_fused).
            layers = self.model.layers
            if attn.fold_norm == "prologue" and len(layers):
                delta = None
                for layer in layers:
                    h, delta = layer.forward_prenorm(h, delta, cos, sin, attn)
                return self.model.norm.add_forward(h, delta)[1]
            norms = [layer.input_layernorm for layer in layers][1:] + [self.model.norm]
            x = (layers[0].input_layernorm if len(layers) else self.model.norm)(h)
            for layer, next_norm in zip(layers, norms, strict=True):
                h, x = layer.forward_fused(h, x, cos, sin, attn, next_norm)
            return x
        for layer in self.model.layers:
            if ckpt:
                h = checkpoint(layer, h, cos, sin, attn, use_reentrant=False)
            else:
                h = layer(h, cos, sin, attn)
        return self.model.norm(h)

    def logits(self, hidden: Tensor) -> Tensor:
        """hidden [T, D] -> float32 logits [T, V]. For many tokens prefer
        orbit.models.logprobs.token_logprobs, which never holds all of them at once."""
        return self.lm_head(hidden).float()

    @property
    def num_layers(self) -> int:
        return self.config.num_layers
