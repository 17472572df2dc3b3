"""PolicyWorker on a tiny random Llama (CPU): rollout log-probs match the trainer's, only the
adapter trains, the serve slot changes only on push, and save/load restores the adapter."""

from __future__ import annotations

import pytest
import torch
from tiny_policy import save_tiny_policy

from orbit.config import parse_args
from orbit.orchestration.steps import assign_advantages
from orbit.trainer.worker import SERVE_SLOT, TRAIN_SLOT, PolicyWorker


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_policy(tmp_path_factory.mktemp("tiny"))


def make_worker(model_dir, *extra: str) -> PolicyWorker:
    cfg = parse_args(["--hf-checkpoint", str(model_dir), "--prompt-data", "unused", "--lr", "1e-2",
                      "--rollout-batch-size", "2", "--n-samples-per-prompt", "4",
                      "--rollout-max-response-len", "6", "--max-prompt-len", "32", *extra])
    return PolicyWorker(cfg)


ROWS = [{"text": "<|user|>1+2=<|end|><|assistant|>", "label": 3, "group_id": 0},
        {"text": "<|user|>4+4=<|end|><|assistant|>", "label": 8, "group_id": 1}]


def rollout_with_signal(w: PolicyWorker):
    samples = w.rollout(ROWS, step=1)
    for i, s in enumerate(samples):  # the random model never answers right: give it a signal
        s.reward = float(i % 2)
    assign_advantages(samples, w.cfg.algo)
    return samples


def test_rollout_logprobs_match_trainer(model_dir) -> None:
    w = make_worker(model_dir)
    samples = w.rollout(ROWS, step=1)
    assert len(samples) == 8 and {s.group_id for s in samples} == {0, 1}
    assert all(len(s.rollout_logprobs) == len(s.response_ids) > 0 for s in samples)
    trainer = w.compute_logprobs(samples)
    diff = max(abs(a - b) for s, lp in zip(samples, trainer) for a, b in zip(s.rollout_logprobs, lp))
    assert diff < 1e-4  # same modules, same kernels, float32 on CPU


def test_exact_mode_rollout_logprobs_equal_trainer_bitwise(model_dir) -> None:
    """--precision-mode exact swaps in batch-invariant kernels: the sampler's log-probs equal
    the trainer's packed-forward log-probs exactly, token by token, also after a train step."""
    w = make_worker(model_dir, "--precision-mode", "exact")
    samples = rollout_with_signal(w)
    trainer = w.compute_logprobs(samples)
    assert all(s.rollout_logprobs == lp for s, lp in zip(samples, trainer))
    w.train_step(samples, total_tokens=sum(len(s.response_ids) for s in samples),
                 num_samples=len(samples))
    w.push_adapter()
    samples = w.rollout(ROWS, step=2)
    trainer = w.compute_logprobs(samples)
    assert all(s.rollout_logprobs == lp for s, lp in zip(samples, trainer))


def test_train_step_updates_adapter_only_and_push_syncs(model_dir) -> None:
    w = make_worker(model_dir, "--kl-coef", "0.1", "--use-tis", "--entropy-coef", "0.01")
    base = {n: p.detach().clone() for n, p in w.model.named_parameters() if "lora" not in n}
    before = w.adapter_state()
    samples = rollout_with_signal(w)
    total = sum(len(s.response_ids) for s in samples)
    m = w.train_step(samples, total, len(samples))
    for k in ("train/pg_loss", "train/kl", "train/entropy", "train/grad_norm", "train/pg_clipfrac",
              "train/train_rollout_logprob_abs_diff_mean", "train/train_rollout_kl_k3",
              "train/is_ratio_mean", "train/is_ratio_max"):
        assert k in m, k
    assert m["train/grad_norm"] > 0
    after = w.adapter_state()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    for n, p in w.model.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]) and p.grad is None, n
    # AdamW holds state only for the float32 master copies of the adapter
    opt_params = w.optimizer.param_groups[0]["params"]
    assert len(opt_params) == len(w.params) and all(p.dtype == torch.float32 for p in opt_params)
    assert sum(p.numel() for p in opt_params) == w.adapters.num_trainable()
    assert all(torch.equal(m.to(p.dtype), p) for m, p in zip(w.master, w.params))
    # the engine still serves the old adapter until push_adapter
    assert not torch.equal(w.adapters.flat(TRAIN_SLOT), w.adapters.flat(SERVE_SLOT))
    assert w.push_adapter() >= 0
    assert torch.equal(w.adapters.flat(TRAIN_SLOT), w.adapters.flat(SERVE_SLOT))


def test_save_load_round_trip(model_dir, tmp_path) -> None:
    w = make_worker(model_dir)
    samples = rollout_with_signal(w)
    w.train_step(samples, sum(len(s.response_ids) for s in samples), len(samples))
    w.save(str(tmp_path))
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    fresh = make_worker(model_dir)
    fresh.load(str(tmp_path))
    a, b = w.adapter_state(), fresh.adapter_state()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert fresh.optim_step == 1
    assert torch.equal(fresh.adapters.flat(SERVE_SLOT), fresh.adapters.flat(TRAIN_SLOT))


def test_prequantized_checkpoint_keeps_its_format(model_dir, tmp_path) -> None:
    """The INT4 launcher passes --quant-format int4; a compressed-tensors INT4 checkpoint is read
    as stored (the loader refuses to requantize it), and the adapter trains on top of it."""
    import json
    import re
    import shutil

    from safetensors.torch import load_file, save_file

    from orbit.models.loader import DEFAULT_QUANT_TARGETS
    from orbit.quant.checkpoint import write_linear
    from orbit.quant.linear import QuantLinear
    from orbit.quant.qconfig import quantization_config
    from orbit.quant.quantize import quantize

    dst = tmp_path / "ct"
    shutil.copytree(model_dir, dst)
    out = {}
    for name, t in load_file(model_dir / "model.safetensors").items():
        mod = name.removesuffix(".weight")
        if name.endswith(".weight") and any(re.fullmatch(p, mod) for p in DEFAULT_QUANT_TARGETS):
            out.update(write_linear(quantize(t, "int4", group_size=32), mod, "compressed-tensors"))
        else:
            out[name] = t
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = quantization_config("compressed-tensors", "int4", group_size=32)
    (dst / "config.json").write_text(json.dumps(cfg))

    w = make_worker(dst, "--quant-format", "int4", "--quant-group-size", "32")
    q = w.model.model.layers[0].self_attn.q_proj.base
    assert isinstance(q, QuantLinear) and q.weight_format == "int4"
    samples = rollout_with_signal(w)
    m = w.train_step(samples, sum(len(s.response_ids) for s in samples), len(samples))
    assert m["train/grad_norm"] > 0


def test_zero_advantage_samples_are_skipped_with_the_same_update(model_dir) -> None:
    """A group whose rewards agree has all-zero GRPO advantages: skipping it (the default)
    must give the same adapter update as training on it, and the metric says how many."""
    updates = {}
    for flag in ((), ("--no-skip-zero-advantage",)):
        torch.manual_seed(0)
        w = make_worker(model_dir, *flag)
        samples = w.rollout(ROWS, step=1)
        for s in samples:  # group 0 disagrees (signal), group 1 all 1.0 (zero advantages)
            s.reward = float(s.index % 2) if s.group_id == 0 else 1.0
        assign_advantages(samples, w.cfg.algo)
        before = w.adapter_state()
        m = w.train_step(samples, sum(len(s.response_ids) for s in samples), len(samples))
        after = w.adapter_state()
        updates[flag] = {k: after[k] - before[k] for k in before}
        assert m["train/skipped_zero_adv_frac"] == (0.5 if not flag else 0.0)
        assert m["train/grad_norm"] > 0
    skip, full = updates[()], updates[("--no-skip-zero-advantage",)]
    for k in skip:
        torch.testing.assert_close(skip[k], full[k], rtol=1e-5, atol=1e-7)
    assert any(v.abs().max() > 0 for v in skip.values())


def test_step_with_every_sample_skipped_keeps_its_metrics(model_dir) -> None:
    w = make_worker(model_dir)
    samples = w.rollout(ROWS, step=1)
    for s in samples:
        s.reward = 1.0  # every group agrees: nothing to learn, nothing forwarded
    assign_advantages(samples, w.cfg.algo)
    m = w.train_step(samples, sum(len(s.response_ids) for s in samples), len(samples))
    assert m["train/skipped_zero_adv_frac"] == 1.0 and m["perf/train_tokens"] == 0.0
    for k in ("train/pg_loss", "train/entropy", "train/train_rollout_logprob_abs_diff_mean"):
        assert m[k] == 0.0, k
    assert m["train/grad_norm"] == 0.0
