"""What each kind of kernel costs a batch-1 decode step, by leaving it out.

Each variant builds a fresh engine (its CUDA graphs captured with the kernels left out) over
the same model and times `generate` as bench_engine's roofline section does; the difference
to the baseline is what that kind of kernel costs on the step's critical path, PDL overlap
and launch boundaries included, which neither a profiler's per-kernel times (PDL waits fold
into them) nor Nsight Compute's isolated durations give. The outputs of an ablated step are
garbage (a left-out kernel leaves its output unwritten), so the hidden state is clamped to
[-1, 1] before the LM head in every variant, the baseline included (one small launch), so
that the sampler always sees finite logits. A diagnostic for docs/rollout.md's design
choices, not a benchmark row.

Left out, per variant (comma list with --variants; `base` always runs first):
  addnorm  the residual add + RMSNorm launches (RMSNorm.add_forward)
  rope     the q/k norm + RoPE + cache-write launches (rope.qk_norm_rope_kv)
  attn     the decode attention launches (AttnBatch.attend)
  mlp      the MLP: with --chain-mlp on the persistent chain launch, or (off, the engine's
           default) the gate/up GEMV only (down_proj keeps its launch)
  gemv     every quantized linear and the MLP (QuantLinear.forward, the chain)
  lmhead   the LM head (a zero logits buffer instead)
  sampler  the sampler kernels (token 0 with log-prob 0 for every row, from cached buffers)
  nongemv  addnorm + rope + attn + lmhead together (the GEMVs alone)
  empty    addnorm + rope + attn + lmhead + gemv (graph replay, the sampler and the host's
           work alone)

    python scripts/bench/ablate_decode.py [--shape qwen3-1.7b] [--format int4]
        [--variants addnorm,rope,attn,mlp,gemv,lmhead,nongemv,empty] [--chain-mlp on|off]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

GROUPS = {"nongemv": ("addnorm", "rope", "attn", "lmhead"),
          "empty": ("addnorm", "rope", "attn", "lmhead", "gemv")}
PARTS = ("addnorm", "rope", "attn", "mlp", "gemv", "lmhead", "sampler")


def _no_mlp(mlp: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


@contextlib.contextmanager
def left_out(parts: tuple[str, ...]) -> Iterator[None]:
    """Patch the model code so that the named kinds of kernel are not launched (their outputs
    are fresh, unwritten tensors of the right shape); the clamp before the LM head always."""
    from orbit.models import transformer as tmod
    from orbit.models.attention import AttnBatch
    from orbit.quant.linear import QuantLinear
    from orbit.rollout import engine as emod

    zeros: dict[tuple, torch.Tensor] = {}

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if "lmhead" in parts:
            key = (hidden.shape[0], self.config.vocab_size, hidden.device)
            if key not in zeros:
                zeros[key] = torch.zeros(key[:2], device=hidden.device)
            return zeros[key]
        return self.lm_head(hidden.clamp(-1.0, 1.0)).float()

    def sample(logits: torch.Tensor, batch, **kw) -> tuple[torch.Tensor, torch.Tensor]:
        key = ("sample", logits.shape[0], logits.device)
        if key not in zeros:
            zeros[key] = torch.zeros(logits.shape[0], dtype=torch.int64, device=logits.device)
            zeros[key + ("lp",)] = torch.zeros(logits.shape[0], device=logits.device)
        return zeros[key], zeros[key + ("lp",)]

    patches: list[tuple[object, str, Callable]] = [(tmod.CausalLM, "logits", logits)]
    if "sampler" in parts:
        patches.append((emod, "sample", sample))
    if "addnorm" in parts:
        patches.append((tmod.RMSNorm, "add_forward", lambda self, x, delta: (x, x)))
    if "rope" in parts:
        patches.append((tmod, "qk_norm_rope_kv", lambda q, *a: q))
    if "attn" in parts:
        patches.append((AttnBatch, "attend", lambda self, layer, q, k, v: q))
    if "mlp" in parts or "gemv" in parts:
        patches.append((tmod, "_chain_mlp", _no_mlp))
        patches.append((tmod.MLP, "forward", lambda self, x: torch.empty_like(x)))
        patches.append((tmod.MLP, "hidden", lambda self, x: x.new_empty(
            *x.shape[:-1], self.down_proj.in_features)))
    if "gemv" in parts:
        patches.append((QuantLinear, "forward", lambda self, x: x.new_empty(
            *x.shape[:-1], self.out_features)))
    with contextlib.ExitStack() as stack:
        for obj, name, fn in patches:
            stack.enter_context(mock.patch.object(obj, name, fn))
        yield


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="qwen3-1.7b")
    ap.add_argument("--format", default="int4")
    ap.add_argument("--variants",
                    default="addnorm,rope,attn,mlp,gemv,lmhead,sampler,nongemv,empty")
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--chain-mlp", default="off", choices=("on", "off"))
    args = ap.parse_args()
    from bench_engine import _format_model, prompts, run_orbit

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    model = _format_model(args.shape, args.format, torch.bfloat16 if cuda else torch.float32,
                          device)
    ps = prompts(1, args.prompt_len, model.config.vocab_size)
    kw = {"attn_backend": "triton" if cuda else "auto", "chain_mlp": args.chain_mlp == "on"}
    base = None
    for name in ["base", *[v for v in args.variants.split(",") if v]]:
        parts = GROUPS.get(name, (name,) if name != "base" else ())
        unknown = [p for p in parts if p not in PARTS]
        if unknown:
            raise SystemExit(f"unknown variant {name!r} (parts: {', '.join(PARTS)}, groups: "
                             f"{', '.join(GROUPS)})")
        with left_out(parts):
            st = run_orbit(model, ps, args.new, device, **kw)
        us = 1e6 / st["decode_tokens_per_s"]
        base = us if base is None else base
        print(f"{name:8s} {us:8.1f} us/step ({st['decode_tokens_per_s']:7.1f} tok/s)  "
              f"left out: {'+'.join(parts) or '-':32s} saves {base - us:7.1f} us", flush=True)


if __name__ == "__main__":
    main()
