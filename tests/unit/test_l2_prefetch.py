"""The experimental weight prefetcher's chunk plan (orbit/rollout/l2_prefetch.py): every byte of
every tensor covered, 16-byte aligned starts and sizes, no piece over the chunk, repeated
ranges (the same tensor twice) planned once. The prefetch itself runs on CUDA only
(tests/gpu/test_l2_prefetch_gpu.py: the same bits with it on)."""

from __future__ import annotations

import torch

from orbit.rollout.l2_prefetch import plan_chunks


def _covered(t: torch.Tensor, ranges: list[tuple[int, int]]) -> bool:
    """Whether sorted [start, end) byte ranges cover every byte of `t` (walked in order)."""
    lo, hi = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    pos = lo
    for a, b in ranges:
        if a <= pos < b:
            pos = b
    return pos >= hi


def test_plan_covers_every_byte_aligned_and_bounded() -> None:
    buf = torch.zeros(300_001, dtype=torch.int8)
    ts = [buf[3:200_003], buf[200_003:], torch.zeros(77, dtype=torch.bfloat16), buf[3:200_003],
          torch.zeros(0)]
    addrs, sizes = plan_chunks(ts, chunk=1 << 14)
    assert all(a % 16 == 0 for a in addrs) and all(s % 16 == 0 and 0 < s <= 1 << 14 for s in sizes)
    covered = sorted((a, a + s) for a, s in zip(addrs, sizes))
    for t in ts[:3]:
        assert _covered(t, covered), t.shape
    # the repeated view adds nothing; the empty tensor adds nothing
    once, _ = plan_chunks(ts[:3], chunk=1 << 14)
    assert len(once) == len(addrs)


def _ranges(table) -> list[tuple[int, int]]:
    return sorted((int(a), int(a) + int(s)) for a, s in zip(table.addrs, table.sizes))


def test_layer_tables_hold_the_gemvs_after_each_attention() -> None:
    """Each layer's table covers its o_proj and MLP QuantLinear buffers (with 'next' also the
    next layer's q/k/v), and no byte of its own q/k/v (read before the attention runs)."""
    from orbit.models.config import ModelConfig
    from orbit.models.transformer import CausalLM
    from orbit.quant.convert import convert_linears
    from orbit.rollout.l2_prefetch import layer_tables

    torch.manual_seed(0)
    cfg = ModelConfig(arch="Qwen3ForCausalLM", vocab_size=97, hidden_size=128,
                      intermediate_size=256, num_layers=3, num_heads=4, num_kv_heads=2,
                      head_dim=32, qk_norm=True, max_position_embeddings=256, eos_token_id=1)
    model = CausalLM(cfg).requires_grad_(False)
    convert_linears(model, "int4")
    layers = list(model.model.layers)

    def bufs(m: torch.nn.Module) -> list[torch.Tensor]:
        return [b for b in m.buffers() if b is not None and b.numel()]

    for ahead in ("rest", "next"):
        tables = layer_tables(model, torch.device("cpu"), ahead)
        assert sorted(tables) == [0, 1, 2]
        for i, layer in enumerate(layers):
            r = _ranges(tables[i])
            assert tables[i].addrs.dtype == torch.int64 and tables[i].sizes.dtype == torch.int32
            for b in bufs(layer.self_attn.o_proj) + bufs(layer.mlp):
                assert _covered(b, r), (ahead, i)
            for name in ("q_proj", "k_proj", "v_proj"):
                own = bufs(getattr(layer.self_attn, name))
                assert not any(_covered(b, r) for b in own), (ahead, i, name)
                if i + 1 < len(layers):
                    nxt = bufs(getattr(layers[i + 1].self_attn, name))
                    assert all(_covered(b, r) for b in nxt) == (ahead == "next"), (ahead, i)
    try:
        layer_tables(model, torch.device("cpu"), "all")
    except ValueError as e:
        assert "'rest' or 'next'" in str(e)
    else:
        raise AssertionError("an unknown 'ahead' must be refused")


def test_launch_args_spread_the_table_over_the_programs() -> None:
    from orbit.kernels.pdl import L2Prefetch, l2_prefetch_args

    t = L2Prefetch(torch.zeros(336, dtype=torch.int64), torch.zeros(336, dtype=torch.int32))
    args, consts = t.launch_args(128)
    assert args[2] == 336 and consts == {"PF_PER": 4, "PF_LANES": 128}  # 3 rounded up
    assert t.launch_args(8)[1] == {"PF_PER": 64, "PF_LANES": 128}
    assert t.launch_args(1)[1] == {"PF_PER": 512, "PF_LANES": 512}
    dummy = torch.zeros(1)
    assert l2_prefetch_args(None, 128, dummy) == ((dummy, dummy, 0), {"PF_PER": 0, "PF_LANES": 128})


def test_sm90_compile_issues_the_prefetch_before_the_wait() -> None:
    """Both issuing launches (decode attention, q/k norm + RoPE) compiled for sm_90 with
    PF_PER > 0 hold the bulk prefetch, ahead of griddepcontrol.wait; PF_PER = 0 has none."""
    import pytest
    from bench_scripts import load_bench

    tool = load_bench("sm90_compile")
    if not (tool.BIN / "ptxas").exists():
        pytest.skip("this Triton ships no ptxas")
    from orbit.kernels.attention_decode import _attn_decode_split_kernel
    from orbit.kernels.rope import _qk_norm_rope_kv_kernel

    ptr = {"pf_addr_ptr": "*i64", "pf_size_ptr": "*i32", "start_ptr": "*i64",
           "slot_ptr": "*i64", "pos_ptr": "*i64", "acc_ptr": "*fp32", "ml_ptr": "*fp32",
           "cnt_ptr": "*i32", "qk_scale": "fp32", "eps": "fp32"}
    attn = {"GROUP": 2, "D": 128, "BLOCK_D": 128, "BLOCK_M": 16, "BLOCK_N": 64, "IEEE": False,
            "DIRECT": False, "PREFETCH": False, "PDL": True, "SP": 16}
    rope = {"D": 128, "HAS_NORM": True, "PDL": True}
    for fn, consts, warps in ((_attn_decode_split_kernel, attn, 4), (_qk_norm_rope_kv_kernel, rope, 1)):
        for per in (0, 4):
            ptx = tool.compile_sm90(fn, {**consts, "PF_PER": per, "PF_LANES": 128}, ptr,
                                    warps=warps).asm["ptx"]
            n = ptx.count("cp.async.bulk.prefetch.L2")
            # (one per element a thread holds: 128 lanes over 32 * warps threads)
            assert n == (128 // (32 * warps) if per else 0), (fn, per, n)
            if per:
                assert ptx.index("cp.async.bulk.prefetch.L2") < ptx.index("griddepcontrol.wait")
