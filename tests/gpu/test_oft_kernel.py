"""GPU checks of the Triton OFT block rotation against the float64 reference, and of OFT /
LoRA modules and slot staging on CUDA against the same modules on CPU.

Each check draws fresh random activations and random orthogonal blocks, poisons the output
with NaN (every element must be written), and compares by relative norm against
`x (float64) @ blockdiag(R) (float64)`. Run: `pytest -m gpu tests/gpu/test_oft_kernel.py`.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from orbit.adapters import AdapterConfig, OFTLinear, inject_adapters
from orbit.kernels.oft_rotate import (
    _OFTRotate,
    oft_rotate,
    oft_rotate_reference,
    oft_rotate_triton,
    triton_usable,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# (in_features, block): Qwen3-4B q/k/v/gate/up input, o input, down input; odd and large blocks.
SHAPES = [
    (2560, 32),
    (4096, 32),
    (9728, 32),
    (2560, 16),
    (2560, 64),
    (4096, 128),
    (96, 24),
    (40, 8),
]
ROWS = [1, 7, 300, 4096]
TOL = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def _rot(n: int, b: int, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    a = torch.randn(n, b, b, device="cuda", generator=g, dtype=torch.float64)
    return torch.linalg.qr(a).Q.float()  # orthogonal blocks, like a trained OFT


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("k,b", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shared", [False, True])
def test_forward_matches_reference(k, b, dtype, shared):
    n = k // b
    for i, m in enumerate(ROWS):
        x = torch.randn(
            m, k, device="cuda", generator=torch.Generator(device="cuda").manual_seed(i)
        ).to(dtype)
        rot = _rot(1 if shared else n, b, seed=100 + i)
        out = torch.full_like(x, float("nan"))
        y = oft_rotate_triton(x, rot, out=out)
        assert y.data_ptr() == out.data_ptr() and not torch.isnan(y).any()
        ref = oft_rotate_reference(x.double(), rot.double())
        assert _rel(y, ref) < TOL[dtype], (k, b, m, dtype, shared, _rel(y, ref))


def test_strided_and_batched_inputs():
    k, b = 2560, 32
    rot = _rot(k // b, b, seed=7)
    big = torch.randn(33, k + 64, device="cuda", dtype=torch.bfloat16)
    x = big[:, 64:]  # row stride k + 64, unit column stride
    ref = oft_rotate_reference(x.double(), rot.double())
    assert _rel(oft_rotate_triton(x, rot), ref) < TOL[torch.bfloat16]
    x3 = torch.randn(3, 11, k, device="cuda", dtype=torch.bfloat16)
    y3 = oft_rotate(x3, rot)
    assert y3.shape == x3.shape
    assert _rel(y3, oft_rotate_reference(x3.double(), rot.double())) < TOL[torch.bfloat16]
    assert not triton_usable(x3, torch.zeros(1, 256, 256, device="cuda"))  # falls back


@pytest.mark.parametrize("shared", [False, True])
def test_backward_matches_reference(shared):
    k, b, m = 4096, 32, 257
    x = torch.randn(m, k, device="cuda", dtype=torch.float32, requires_grad=True)
    rot = (_rot(1 if shared else k // b, b, seed=3) + 0.01).requires_grad_(True)
    gy = torch.randn(m, k, device="cuda")
    (_OFTRotate.apply(x, rot) * gy).sum().backward()
    gx, gr = x.grad.clone(), rot.grad.clone()
    xd, rd = x.detach().double().requires_grad_(True), rot.detach().double().requires_grad_(True)
    (oft_rotate_reference(xd, rd) * gy.double()).sum().backward()
    assert _rel(gx, xd.grad) < 1e-5 and _rel(gr, rd.grad) < 1e-5


def test_oft_linear_cuda_matches_cpu():
    torch.manual_seed(0)
    lin = nn.Linear(2560, 1024, bias=False)
    cpu = OFTLinear(lin, block_size=32, dtype=torch.float32)
    with torch.no_grad():
        cpu.oft_R.normal_(0, 0.05)
    gpu = copy.deepcopy(cpu).cuda()
    x = torch.randn(64, 2560)
    y_cpu = cpu(x)
    y_gpu = gpu(x.cuda())
    assert _rel(y_gpu.cpu(), y_cpu.double()) < 1e-5
    y_cpu.square().mean().backward()
    gpu(x.cuda()).square().mean().backward()
    assert _rel(gpu.oft_R.grad.cpu(), cpu.oft_R.grad.double()) < 1e-4


@pytest.mark.parametrize("kind", ["lora", "oft"])
def test_stage_on_side_stream(kind):
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(256, 256) for _ in range(4)]).cuda().to(torch.bfloat16)
    aset = inject_adapters(
        model, AdapterConfig(kind=kind, r=8, block_size=32, targets=("re:\\d+",))
    )
    x = torch.randn(16, 256, device="cuda", dtype=torch.bfloat16)
    opt = torch.optim.AdamW(aset.trainable_parameters(), lr=1e-2)
    for step in range(3):
        model(x).float().square().mean().backward()
        opt.step()
        opt.zero_grad()
        aset.stage(0, 1, wait=False)  # async copy right after the optimizer's kernels
        aset.set_active(1)  # waits for the copy on the GPU, not the host
        served = model(x)
        aset.set_active(0)
        assert torch.equal(served, model(x)), step
        assert torch.equal(aset.flat(0), aset.flat(1))


@pytest.mark.parametrize("b,m", [(32, 1), (32, 64), (64, 7)])
def test_pdl_chain_of_frozen_rotations_matches_plain_launches(b: int, m: int) -> None:
    """The rollout path (`oft_rotate_frozen`, R split once) inside `pdl_scope(True)`: a chain
    of rotations, each reading the previous output, eager and replayed from a CUDA graph,
    gives the bits of plain launches, and the per-call split's."""
    from orbit.kernels import pdl as pdl_mod
    from orbit.kernels.oft_rotate import oft_rotate_frozen, split_rotation

    if not pdl_mod.pdl_available(torch.device("cuda")):
        pytest.skip("PDL needs sm_90+ and Triton with griddepcontrol")
    k = 2048
    rots = [_rot(k // b, b, seed=40 + i) for i in range(4)]
    splits = [split_rotation(r, torch.bfloat16) for r in rots]
    x0 = torch.randn(m, k, device="cuda").bfloat16()

    def chain(pdl: bool) -> torch.Tensor:
        y = x0
        with pdl_mod.pdl_scope(pdl):
            for sr in splits:
                y = oft_rotate_frozen(y, sr)
        return y

    from pdl_chain import assert_pdl_chain_matches_plain

    plain = assert_pdl_chain_matches_plain(chain)
    y = x0
    for r in rots:
        y = oft_rotate_triton(y, r)
    assert torch.equal(plain, y)


@pytest.mark.parametrize("k,b,shared", [(2048, 32, False), (2560, 64, True)])
@pytest.mark.parametrize("m", [1, 64, 300])
def test_group_rotation_matches_each_member(k: int, b: int, shared: bool, m: int) -> None:
    """q/k/v's rotations of one x in one launch (`oft_rotate_group_triton`): each member's
    slice is bit for bit its lone rotation (so every element written), inside pdl_scope
    too."""
    from orbit.kernels import pdl as pdl_mod
    from orbit.kernels.oft_rotate import concat_splits, oft_rotate_group_triton, split_rotation

    rots = [_rot(1 if shared else k // b, b, seed=60 + i) for i in range(3)]
    x = torch.randn(m, k, device="cuda").bfloat16()
    stack = concat_splits([split_rotation(r, torch.bfloat16) for r in rots])
    for pdl in (False, True):
        with pdl_mod.pdl_scope(pdl):
            ys = oft_rotate_group_triton(x, stack, 3)
        assert ys.shape == (3, m, k) and torch.isfinite(ys).all()
        for g, r in enumerate(rots):
            assert torch.equal(ys[g], oft_rotate_triton(x, r)), (g, pdl)
