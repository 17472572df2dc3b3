"""CPU checks of the fused LoRA decode path: the shrink / expand-add kernels
(orbit/kernels/lora_decode.py) under Triton's interpreter against the unfused LoRA forward on
fresh random inputs (1-3 members, rows across one and two row blocks, ranks that are and are
not powers of two, column tails), and the decode groups (orbit/adapters/lora_decode.py) in a
tiny model: same logits as the plain forward, two launches per group, the plain path wherever
the fused one must not run."""

from __future__ import annotations

import json

import pytest
import torch
from triton_interp import patch_interpreter, run_in_interpreter

triton = pytest.importorskip("triton")

# (K, [N_s], r, M)
CASES = [(64, [48], 8, 1), (96, [64, 32, 32], 16, 1), (128, [80, 80], 12, 3),
         (64, [40, 24, 24], 16, 16), (72, [96], 4, 20), (128, [64, 64], 16, 64),
         (600, [200, 56], 16, 8), (1100, [48, 16, 16], 8, 2),  # (K over 2 and 5 shrink chunks)
         (96, [72, 40], 16, 130)]  # three row blocks of each kernel (a rollout batch)


def _case(k: int, ns: list[int], r: int, m: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    a = [(torch.randn(r, k, generator=g) * 0.2).to(dtype) for _ in ns]
    b = [(torch.randn(n, r, generator=g) * 0.2).to(dtype) for n in ns]
    # the outputs as the sibling GEMV leaves them: column slices of one [M, sum N] buffer
    big = torch.randn(m, sum(ns), generator=g).to(dtype)
    y = list(torch.split(big, ns, dim=1))
    return x, a, b, y, big


def _interpreter_main() -> None:
    patch_interpreter(bf16_dot=True, bf16_round=True)
    from orbit.kernels.lora_decode import lora_decode_reference, lora_decode_triton

    out: dict = {}
    for i, (k, ns, r, m) in enumerate(CASES):
        for dtype in (torch.bfloat16, torch.float32):
            x, a, b, y, big = _case(k, ns, r, m, dtype, 100 + i)
            ref = lora_decode_reference(x, a, b, [t.clone() for t in y], 1.75)
            before = big.clone()
            lora_decode_triton(x, a, b, y, 1.75)
            err = max(((yi.double() - ri.double()).abs().max() / ri.double().abs().max()).item()
                      for yi, ri in zip(y, ref))
            delta = max((yi.double() - bi.double()).abs().max().item()
                        for yi, bi in zip(torch.split(big, ns, 1), torch.split(before, ns, 1)))
            out[f"{i}-{dtype}"] = {"err": err, "delta": delta}
    out["model"] = _model_checks()
    print(json.dumps(out))


def _model_checks() -> dict:
    """A tiny Qwen3 with LoRA on all linears: fused vs plain logits, launch counts."""
    from tiny_qwen3 import tiny_qwen3, with_active_lora

    import orbit.kernels.lora_decode as kmod
    from orbit.adapters.lora_decode import link_lora_decode, unlink_lora_decode
    from orbit.models.attention import AttnBatch

    model = tiny_qwen3(seed=3)
    aset = with_active_lora(model, torch.float32)
    ids = torch.tensor([3, 11, 40, 7])
    pos = torch.arange(4)

    def logits() -> torch.Tensor:
        with torch.inference_mode():
            h = model(ids, pos, AttnBatch.packed(torch.tensor([0, 4])))
            return model.logits(h)

    plain = logits()
    calls = []
    real = kmod.lora_decode_triton
    kmod.lora_decode_triton = lambda *a, **kw: calls.append(len(a[1])) or real(*a, **kw)
    groups = link_lora_decode(model)
    fused = logits()
    n_fused = list(calls)
    calls.clear()
    with torch.no_grad():  # autograd off but not inference mode (a trainer pass): plain
        model.logits(model(ids, pos, AttnBatch.packed(torch.tensor([0, 4]))))
    n_nograd = len(calls)
    calls.clear()
    torch.set_grad_enabled(True)
    h = model(ids, pos, AttnBatch.packed(torch.tensor([0, 4])))  # training forward: plain
    n_grad = len(calls)
    with aset.adapter_disabled(), torch.inference_mode():
        off = model.logits(model(ids, pos, AttnBatch.packed(torch.tensor([0, 4]))))
    n_off = len(calls)
    unlink_lora_decode(model)
    kmod.lora_decode_triton = real
    err = ((fused - plain).norm() / plain.norm()).item()
    with aset.adapter_disabled(), torch.inference_mode():
        base = model.logits(model(ids, pos, AttnBatch.packed(torch.tensor([0, 4]))))
    del h
    return {"groups": groups, "calls": n_fused, "nograd": n_nograd, "grad": n_grad,
            "off": n_off, "err": err, "adapter_effect": ((plain - base).norm() / base.norm()).item(),
            "off_err": ((off - base).abs().max()).item()}


@pytest.fixture(scope="module")
def interp() -> dict:
    return run_in_interpreter(__file__)


@pytest.mark.parametrize("dtype", ["torch.bfloat16", "torch.float32"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_kernels_match_unfused_lora(interp: dict, case: int, dtype: str) -> None:
    r = interp[f"{case}-{dtype}"]
    assert r["delta"] > 0  # the adapter delta landed in the caller's output buffer
    # the unfused forward's roundings; only the summation order differs (bf16: one ulp of y)
    assert r["err"] < (1e-2 if "bfloat16" in dtype else 1e-5), r


def test_groups_in_a_model(interp: dict) -> None:
    r = interp["model"]
    assert r["groups"] == 2 * 4  # per layer: q/k/v, o, gate/up, down
    assert r["calls"] == [3, 1, 2, 1] * 2  # one launch pair per group, members per group
    assert r["nograd"] == 0
    assert r["grad"] == 0 and r["off"] == 0  # training forward / adapter off: plain path
    assert r["adapter_effect"] > 1e-2  # the adapter changes the logits...
    assert r["err"] < 1e-5, r  # ...and fused == plain (float32 model)
    assert r["off_err"] == 0.0


def test_check_members_names_the_bad_tensor() -> None:
    from orbit.kernels.lora_decode import check_members

    x = torch.zeros(2, 64, dtype=torch.bfloat16)
    a = [torch.zeros(8, 64, dtype=torch.bfloat16)]
    b = [torch.zeros(32, 8, dtype=torch.bfloat16)]
    check_members(x, a, b, [torch.zeros(2, 32, dtype=torch.bfloat16)])
    with pytest.raises(ValueError, match=r"y\[0\] must be \[2, 32\]"):
        check_members(x, a, b, [torch.zeros(2, 16, dtype=torch.bfloat16)])
    with pytest.raises(ValueError, match=r"A\[0\] must be contiguous \[8, 64\]"):
        check_members(x, [a[0].T.contiguous().T[:, :32]], b, [torch.zeros(2, 32, dtype=torch.bfloat16)])
    with pytest.raises(ValueError, match="M >= 1"):
        check_members(torch.zeros(0, 64, dtype=torch.bfloat16), a, b, [torch.zeros(0, 32)])
    with pytest.raises(ValueError, match=r"y\[0\] must be \[65, 32\] torch.bfloat16"):
        check_members(torch.zeros(65, 64, dtype=torch.bfloat16), a, b, [torch.zeros(65, 32)])


def test_engine_refuses_fused_lora_in_exact_mode() -> None:
    from tiny_qwen3 import tiny_qwen3

    from orbit.rollout.engine import Engine

    with pytest.raises(ValueError, match="fuse_lora=True"):
        Engine(tiny_qwen3(), max_num_seqs=2, max_model_len=16, exact=True, fuse_lora=True)



def test_groups_leave_int4_rows_17_to_63_to_the_plain_forward(monkeypatch) -> None:
    """lora_decode.PLAIN_ROWS: an INT4-based group serves 1-16 and 64+ rows, not 17-63 (where
    the H100 measured the plain forward faster); a BF16-based one serves every row count."""
    from orbit.adapters import lora_decode
    from orbit.adapters.inject import AdapterConfig, inject_adapters
    from orbit.models.config import ModelConfig
    from orbit.models.transformer import CausalLM
    from orbit.quant.convert import convert_linears

    monkeypatch.setattr(lora_decode, "interpreting", lambda: True)  # (CPU tensors: as on CUDA)
    cfg = ModelConfig(arch="Qwen3ForCausalLM", vocab_size=97, hidden_size=128,
                      intermediate_size=256, num_layers=1, num_heads=4, num_kv_heads=2,
                      head_dim=32, qk_norm=True, max_position_embeddings=256, eos_token_id=1)
    for fmt, plain in (("int4", range(17, 64)), (None, range(0))):
        torch.manual_seed(0)
        model = CausalLM(cfg).requires_grad_(False)
        if fmt:
            convert_linears(model, fmt)
        inject_adapters(model, AdapterConfig(kind="lora", r=4, dtype=torch.float32)).set_active(0)
        lora_decode.link_lora_decode(model)
        group = model.model.layers[0].self_attn.q_proj.decode_group
        with torch.inference_mode():
            for rows in (1, 16, 17, 32, 63, 64, 200):
                x = torch.randn(rows, 128)
                assert group.serves(x) == (rows not in plain), (fmt, rows)


if __name__ == "__main__":
    _interpreter_main()
