"""OFT math against PEFT's own rotation module, and the block rotation op against a dense
block-diagonal matmul (the Triton kernel runs here under TRITON_INTERPRET=1 when installed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft.tuners.oft.layer import OFTRotationModule
from torch import nn

from orbit.adapters.oft import OFTLinear, cayley, skew_from_vec
from orbit.kernels.oft_rotate import oft_rotate, oft_rotate_reference

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "neumann,terms", [(True, 1), (True, 2), (True, 3), (True, 4), (True, 5), (True, 7), (False, 5)]
)
@pytest.mark.parametrize("share", [False, True])
def test_rotation_matches_peft_module(neumann, terms, share):
    in_f, b = 48, 8
    n = in_f // b
    torch.manual_seed(3)
    lin = nn.Linear(in_f, 5, dtype=torch.float64)
    ours = OFTLinear(
        lin,
        block_size=b,
        use_cayley_neumann=neumann,
        num_terms=terms,
        block_share=share,
        dtype=torch.float64,
    )
    theirs = OFTRotationModule(
        1 if share else n,
        b * (b - 1) // 2,
        b,
        in_f,
        block_share=share,
        use_cayley_neumann=neumann,
        num_cayley_neumann_terms=terms,
    ).double()
    with torch.no_grad():
        ours.oft_R.normal_(0, 0.1)
        theirs.weight.copy_(ours.oft_R)
    x = torch.randn(4, 3, in_f, dtype=torch.float64)
    torch.testing.assert_close(oft_rotate(x, ours.rotation(0)), theirs(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.block_diag(0), theirs.get_weight(), rtol=1e-12, atol=1e-12)


def test_cayley_properties():
    torch.manual_seed(0)
    b = 6
    q = skew_from_vec(torch.randn(3, b * (b - 1) // 2, dtype=torch.float64) * 0.05, b)
    assert torch.equal(q, -q.transpose(1, 2))
    eye = torch.eye(b, dtype=torch.float64)
    exact = cayley(q, use_neumann=False)
    torch.testing.assert_close(exact @ exact.transpose(1, 2), eye.expand(3, b, b))
    torch.testing.assert_close(exact, (eye - q) @ torch.linalg.inv(eye + q))
    # The Neumann series converges to (I + Q)(I - Q)^-1, the transpose of the exact path.
    torch.testing.assert_close(cayley(q, True, 40), exact.transpose(1, 2))
    zero = cayley(torch.zeros(2, b, b), use_neumann=True)
    assert torch.equal(zero, torch.eye(b).expand(2, b, b))


def test_oft_init_is_identity_and_rotation_is_orthogonal():
    lin = nn.Linear(32, 7)
    m = OFTLinear(lin, r=4, use_cayley_neumann=False, dtype=torch.float32)
    x = torch.randn(3, 32)
    torch.testing.assert_close(m(x), lin(x), rtol=0, atol=0)
    with torch.no_grad():
        m.oft_R.normal_(0, 0.3)
    rot = m.block_diag(0)
    torch.testing.assert_close(rot @ rot.T, torch.eye(32), atol=1e-5, rtol=0)
    # norms of the rotated input are preserved (the base sees a rotated x, never a new W)
    xr = oft_rotate(x, m.rotation(0))
    torch.testing.assert_close(xr.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(m(x), lin(xr))


@pytest.mark.parametrize("shape,b,n_rot", [((5, 48), 16, 3), ((2, 3, 64), 32, 1), ((7, 40), 8, 5)])
def test_reference_equals_dense_block_diag(shape, b, n_rot):
    torch.manual_seed(1)
    x = torch.randn(*shape, dtype=torch.float64)
    rot = torch.randn(n_rot, b, b, dtype=torch.float64)
    n = shape[-1] // b
    dense = torch.block_diag(*rot.expand(n, b, b).unbind(0))
    torch.testing.assert_close(oft_rotate_reference(x, rot), x @ dense)
    with pytest.raises(ValueError, match="multiple of block size"):
        oft_rotate_reference(torch.randn(2, shape[-1] + 1), rot)


def test_triton_kernel_under_interpreter():
    pytest.importorskip("triton")
    script = r"""
import torch
from orbit.kernels.oft_rotate import (_OFTRotate, concat_splits, oft_rotate_group_triton,
                                     oft_rotate_reference, oft_rotate_triton, split_rotation)
torch.manual_seed(0)
for M, n, b, share, dt in [(5, 3, 16, False, torch.float32), (70, 2, 32, True, torch.float32),
                          (33, 4, 8, False, torch.bfloat16), (9, 2, 20, False, torch.float16),
                          (3, 1, 128, False, torch.bfloat16)]:
    x = torch.randn(M, n * b).to(dt)
    rot = torch.linalg.qr(torch.randn(1 if share else n, b, b)).Q
    y = torch.full_like(x, float("nan"))
    y = oft_rotate_triton(x, rot)
    ref = oft_rotate_reference(x.double(), rot.double())
    err = ((y.double() - ref).norm() / ref.norm()).item()
    tol = 1e-6 if dt == torch.float32 else 4e-3
    assert err < tol, (M, n, b, share, dt, err)
    # the split made once (what OFTLinear caches for rollout) gives the per-call bits
    sr = split_rotation(rot, dt)
    assert torch.equal(oft_rotate_triton(x, sr), y), (M, n, b, share, dt)
# a group of rotations of one x (q/k/v): one launch, each member's slice the lone bits
for G, n, b, share, dt in [(3, 4, 16, False, torch.bfloat16), (2, 2, 32, True, torch.float32),
                          (3, 2, 8, False, torch.float16)]:
    xg = torch.randn(7, n * b).to(dt)
    rots = [torch.linalg.qr(torch.randn(1 if share else n, b, b)).Q for _ in range(G)]
    ys = oft_rotate_group_triton(xg, concat_splits([split_rotation(r, dt) for r in rots]), G)
    assert ys.shape == (G, 7, n * b)
    for g in range(G):
        assert torch.equal(ys[g], oft_rotate_triton(xg, rots[g])), (G, n, b, share, dt, g)
try:
    oft_rotate_triton(x, split_rotation(rot, torch.float32))
    raise AssertionError("a split for another dtype was accepted")
except ValueError as e:
    assert "split for" in str(e)
# autograd through the kernel (forward + transposed-block backward) vs the reference
x = torch.randn(6, 64, dtype=torch.float32, requires_grad=True)
rot = torch.randn(2, 32, 32, requires_grad=True)
gy = torch.randn(6, 64)
(_OFTRotate.apply(x, rot) * gy).sum().backward()
gx, gr = x.grad.clone(), rot.grad.clone()
x.grad = rot.grad = None
(oft_rotate_reference(x, rot) * gy).sum().backward()
torch.testing.assert_close(gx, x.grad, rtol=1e-5, atol=1e-5)
torch.testing.assert_close(gr, rot.grad, rtol=1e-5, atol=1e-5)
print("ok")
"""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_inference_forward_splits_r_once_per_adapter_version(monkeypatch):
    """Without autograd (rollout) OFTLinear rotates with the kernel split of R it cached: made
    once per slot version and x dtype, remade after a write, and the output is the
    autograd path's bit for bit."""
    import orbit.adapters.oft as oft_mod

    calls = []
    real = oft_mod.split_rotation
    monkeypatch.setattr(oft_mod, "split_rotation",
                        lambda rot, dtype: calls.append(dtype) or real(rot, dtype))
    torch.manual_seed(3)
    m = OFTLinear(nn.Linear(64, 24), block_size=16, dtype=torch.float32)
    with torch.no_grad():
        m.oft_R.normal_(0, 0.1)
    m.active_slot = 0
    x = torch.randn(5, 64)
    with torch.no_grad():
        y1, y2 = m(x), m(x)
    assert calls == [torch.float32] and torch.equal(y1, y2)
    xg = x.clone().requires_grad_(True)
    assert torch.equal(m(xg), y1)  # the autograd path: same rotation, same bits
    assert calls == [torch.float32]
    with torch.no_grad():
        m.oft_R.add_(0.05)
        m.slots_written()
        y3 = m(x)
    assert calls == [torch.float32] * 2 and not torch.equal(y3, y1)


def test_sibling_oft_linears_rotate_in_one_call(monkeypatch):
    """q/k/v OFT linears linked by `link_oft_groups`: without autograd the first member's call
    rotates the shared input for all three (one group call), each output is the unlinked
    module's bit for bit; with autograd each member rotates alone."""
    import orbit.adapters.oft as oft_mod

    monkeypatch.setattr(oft_mod, "GROUP_ROTATIONS", True)  # (whatever the default)

    torch.manual_seed(5)

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = OFTLinear(nn.Linear(64, 64), block_size=16, dtype=torch.float32)
            self.k_proj = OFTLinear(nn.Linear(64, 32), block_size=16, dtype=torch.float32)
            self.v_proj = OFTLinear(nn.Linear(64, 32), block_size=16, dtype=torch.float32)

        def forward(self, h):
            return self.q_proj(h), self.k_proj(h), self.v_proj(h)

    attn = Attn()
    with torch.no_grad():
        for m in (attn.q_proj, attn.k_proj, attn.v_proj):
            m.oft_R.normal_(0, 0.1)
            m.active_slot = 0
    h = torch.randn(5, 64)
    with torch.inference_mode():
        alone = attn(h)
    assert oft_mod.link_oft_groups(attn) == 1
    calls = []
    real = oft_mod.oft_rotate_group_frozen
    monkeypatch.setattr(oft_mod, "oft_rotate_group_frozen",
                        lambda x, sr, g: calls.append(g) or real(x, sr, g))
    with torch.inference_mode():
        grouped, again = attn(h), attn(h)
    assert calls == [3, 3]
    for a, b_, c in zip(alone, grouped, again):
        assert torch.equal(a, b_) and torch.equal(a, c)
    hg = h.clone().requires_grad_(True)
    with_grad = attn(hg)  # autograd: alone, the same values
    assert calls == [3, 3] and all(torch.equal(a, b_) for a, b_ in zip(alone, with_grad))
    oft_mod.unlink_oft_groups(attn)
    assert attn.q_proj.rotate_group is None


def test_training_after_an_inference_mode_rollout():
    """A rollout (inference mode) before the first training forward must not leave inference
    tensors where backward needs them (the cached skew index)."""
    from orbit.adapters.oft import build_step_rotations

    m = OFTLinear(nn.Linear(64, 24), block_size=16, dtype=torch.float32)
    m.active_slot = 0
    with torch.inference_mode():
        m(torch.randn(3, 64))
    m(torch.randn(3, 64, requires_grad=True)).sum().backward()
    assert m.oft_R.grad is not None
    m.oft_R.grad = None
    build_step_rotations([m])  # the training pre-hook's batched R, same index
    m(torch.randn(3, 64)).sum().backward()
    assert m.oft_R.grad is not None
