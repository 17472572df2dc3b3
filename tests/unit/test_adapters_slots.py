"""Adapter slots: off is exactly the base, staging is one copy into the serve slot, and only
the train slot's per-module parameters (views into one flat buffer) get gradients and updates."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from orbit.adapters import AdapterConfig, LoRALinear, OFTLinear, inject_adapters


class Block(nn.Module):
    def __init__(self, d: int = 32, f: int = 64) -> None:
        super().__init__()
        self.q_proj = nn.Linear(d, d, bias=True)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)
        self.experts = nn.ModuleList([nn.Linear(d, d, bias=False) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.q_proj(x)
        h = h + self.down_proj(torch.relu(self.up_proj(h)))
        return h + sum(e(h) for e in self.experts)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


TARGETS = ("q_proj", "up_proj", "down_proj", r"re:layers\.\d+\.experts\.\d+")
KINDS = [dict(kind="lora", r=4, alpha=8.0), dict(kind="oft", block_size=8)]


def make(kw, dtype=torch.bfloat16):
    torch.manual_seed(0)
    base = Tiny().to(dtype)
    model = copy.deepcopy(base)
    aset = inject_adapters(model, AdapterConfig(targets=TARGETS, dtype=dtype, **kw))
    with torch.no_grad():
        for p in aset.trainable_parameters():
            p.normal_(0, 0.1)
    return base, model, aset


@pytest.mark.parametrize("kw", KINDS)
def test_adapter_off_is_bitwise_base(kw):
    base, model, aset = make(kw)
    x = torch.randn(5, 32, dtype=torch.bfloat16)
    with aset.adapter_disabled():
        off = model(x)
    assert aset.active_slot == 0
    assert torch.equal(off, base(x))
    assert not torch.equal(model(x), base(x))
    assert model.layers[0].q_proj.base is not None and isinstance(
        model.layers[0].experts[1], nn.Module
    )
    assert len(aset.modules) == 2 * 5  # q, up, down, 2 experts per layer
    assert {n.rsplit(".", 1)[0] for n, _ in aset.named_trainable_parameters()} == set(aset.modules)


@pytest.mark.parametrize("kw", KINDS)
def test_stage_copies_train_slot_into_serve_slot(kw):
    base, model, aset = make(kw)
    x = torch.randn(5, 32, dtype=torch.bfloat16)
    train_out = model(x)
    aset.set_active(1)
    # Serve slot still holds the init values: LoRA B = 0 / OFT R = I -> the base output.
    assert torch.equal(model(x), base(x))
    aset.stage(0, 1)
    assert torch.equal(aset.flat(0), aset.flat(1))
    assert torch.equal(model(x), train_out)  # OFT's cached R must be invalidated by stage
    # Training the train slot further does not disturb what is being served.
    with torch.no_grad():
        aset.flat(0).add_(0.05)
    assert torch.equal(model(x), train_out)
    aset.set_active(0)
    assert not torch.equal(model(x), train_out)


@pytest.mark.parametrize("kw", KINDS)
def test_grads_only_on_train_slot_and_adamw_lands_in_flat(kw):
    base, model, aset = make(kw, dtype=torch.float32)
    params = aset.trainable_parameters()
    assert all(p.requires_grad for p in params)
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in params}
    assert aset.num_trainable() == sum(p.numel() for p in params) < aset.flat(0).numel() + 1
    assert not aset.flat(1).requires_grad
    x = torch.randn(7, 32)
    loss = model(x).square().mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert all(p.grad is None for p in base.parameters())
    # Gradient check against finite differences on one parameter entry.
    p = params[0]
    idx = (0, 1)
    eps = 1e-3
    with torch.no_grad():
        p[idx] += eps
        up = model(x).square().mean()
        p[idx] -= 2 * eps
        down = model(x).square().mean()
        p[idx] += eps
    assert abs((up - down).item() / (2 * eps) - p.grad[idx].item()) < 1e-3
    before0, before1 = aset.flat(0).clone(), aset.flat(1).clone()
    opt = torch.optim.AdamW(params, lr=1e-2)
    opt.step()
    assert not torch.equal(aset.flat(0), before0)
    assert torch.equal(aset.flat(1), before1)
    aset.slots.check_bound()  # the optimizer's in-place updates kept the views


@pytest.mark.parametrize("kw", KINDS)
def test_load_into_serve_slot(tmp_path, kw):
    _, model, aset = make(kw)
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    want = model(x)
    aset.save_peft(tmp_path / "ad")
    _, model2, aset2 = make(kw)
    with torch.no_grad():
        aset2.flat(0).zero_()
    aset2.load_peft(tmp_path / "ad", slot=1)
    with aset2.use_slot(1):
        assert torch.equal(model2(x), want)


def test_moving_model_after_inject_is_detected():
    _, model, aset = make(KINDS[0])
    model.to(torch.float32)
    with pytest.raises(RuntimeError, match="no longer view the flat slot buffers"):
        aset.stage()


def test_bad_slot_and_config_values():
    _, _, aset = make(KINDS[0])
    with pytest.raises(ValueError, match="slot"):
        aset.set_active(2)
    with pytest.raises(ValueError, match="kind"):
        AdapterConfig(kind="dora")
    with pytest.raises(ValueError, match="matched no"):
        inject_adapters(Tiny(), AdapterConfig(targets=("nothing_here",)))
    with pytest.raises(ValueError, match="does not divide"):
        OFTLinear(nn.Linear(30, 4), block_size=8)
    with pytest.raises(ValueError, match="in_features"):
        LoRALinear(nn.ReLU(), r=2, alpha=2)


def test_lora_init_and_scale_match_peft_conventions():
    lin = nn.Linear(64, 16)
    m = LoRALinear(lin, r=4, alpha=8, use_rslora=False, dtype=torch.float32)
    assert m.scale == 2.0 and torch.count_nonzero(m.lora_B) == 0
    bound = 1 / 64**0.5  # kaiming_uniform(a=sqrt(5)) on fan_in=64
    assert m.lora_A.abs().max() <= bound and m.lora_A.std() > bound / 4
    assert LoRALinear(lin, r=4, alpha=8, use_rslora=True).scale == 4.0
    x = torch.randn(2, 64)
    m.active_slot = None
    assert torch.equal(m(x), lin(x))


def test_oft_cache_sees_writes_through_flat_buffer():
    _, model, aset = make(KINDS[1])
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    for slot in (0, 1):
        with aset.use_slot(slot), torch.no_grad():
            before = model(x)
            aset.flat(slot).add_(0.05)  # behind the modules' backs: the R cache must notice
            assert not torch.equal(model(x), before)


def test_oft_graph_key():
    """OFT's R is derived outside a captured graph: its key changes with the slot's values."""
    _, model, aset = make(KINDS[1])
    oft = model.layers[0].q_proj
    aset.set_active(1)
    key = oft.graph_key()
    aset.stage()
    assert oft.graph_key() != key and oft.graph_key()[0] == 1
    key = oft.graph_key()
    with torch.no_grad():
        aset.flat(1).add_(0.01)  # a write the module's own tensors do not count
    assert oft.graph_key() != key
    aset.set_active(None)
    assert oft.graph_key() == (None,)
