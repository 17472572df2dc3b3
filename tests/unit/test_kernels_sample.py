"""The two-launch sampling kernel (orbit/kernels/sample.py) against its torch reference, on CPU
under Triton's interpreter (in a subprocess, see tests/triton_interp.py): fresh random logits
at several B and V (V not a multiple of the chunk), temperatures, peaked and flat rows, rows
with -inf stretches, u at its extremes. Float32 sums run in another order than torch's, so a
token may differ from the reference's only where u lies within rounding of a CDF boundary:
every token must sit in its float64 CDF interval (within TOL), and mismatches must be rare.
Also: a row's token does not depend on its batch-mates, and the call is deterministic.
tests/gpu/test_kernels_sample_gpu.py runs the same checks on CUDA at Qwen3's vocab."""

from __future__ import annotations

import json

import pytest
import torch
from triton_interp import patch_interpreter, run_in_interpreter

pytest.importorskip("triton")
TOL = 1e-5  # on the normalised CDF: float32 sums over <= 152k terms stay well inside it
# (B, V, chunk, temperature range, logit scale); chunk = None is the shipped CHUNK.
CASES = [(1, 100, 16, (1.0, 1.0), 1.0), (7, 1000, 64, (0.3, 2.0), 3.0),
         (8, 5000, 256, (0.5, 1.5), 1.0), (5, 4099, 256, (0.7, 0.7), 20.0),
         (3, 4096, 1024, (1.0, 1.0), 0.05), (2, 151936, None, (0.6, 1.2), 4.0)]
U_MIN, U_MAX = 2.0**-24, 1.0 - 2.0**-24  # the extremes counter_uniform can return


def cdf_check(logits: torch.Tensor, t: torch.Tensor, u: torch.Tensor, tok: torch.Tensor) -> list[bool]:
    """Per row: tok has positive mass and its float64 CDF interval holds u (within TOL)."""
    z = (logits / t[:, None]).double()  # the float32 z both samplers see
    p = torch.softmax(z, -1)
    cdf = p.cumsum(-1)
    hi = cdf.gather(1, tok[:, None]).squeeze(1)
    lo = hi - p.gather(1, tok[:, None]).squeeze(1)
    pos = torch.exp(z.gather(1, tok[:, None]).squeeze(1) - z.max(-1).values) > 0
    return (pos & (lo - TOL <= u.double()) & (u.double() <= hi + TOL)).tolist()


def _case(i: int, B: int, V: int, trange: tuple[float, float], scale: float):
    g = torch.Generator().manual_seed(1000 + i)
    logits = torch.randn(B, V, generator=g) * scale
    if B >= 3:  # -inf stretches: a masked head, a masked tail, a masked middle
        logits[0, : V // 3] = float("-inf")
        logits[1, V // 2 :] = float("-inf")
        logits[2, V // 4 : V // 2] = float("-inf")
    t = trange[0] + (trange[1] - trange[0]) * torch.rand(B, generator=g)
    u = torch.rand(B, generator=g).clamp(U_MIN, U_MAX)
    u[0] = U_MIN  # the masked-head row: its first unmasked token's interval
    u[1 % B] = U_MAX  # the masked-tail row: the target sits at the end of the mass
    return logits, t, u


def _interpreter_main() -> None:
    patch_interpreter()
    from orbit.kernels.sample import CHUNK, sample_rows_reference, sample_rows_triton

    out: dict = {}
    for i, (B, V, chunk, trange, scale) in enumerate(CASES):
        logits, t, u = _case(i, B, V, trange, scale)
        kw = {} if chunk is None else {"chunk": chunk}
        tok = sample_rows_triton(logits, t, u, **kw)
        ref = sample_rows_reference(logits, t, u)
        part = sample_rows_triton(logits[B // 2 : B // 2 + 1], t[B // 2 : B // 2 + 1],
                                  u[B // 2 : B // 2 + 1], **kw)
        out[str(i)] = {
            "tok": tok.tolist(), "ref": ref.tolist(), "ok": cdf_check(logits, t, u, tok),
            "ref_ok": cdf_check(logits, t, u, ref), "alone": part.item() == tok[B // 2].item(),
            "again": torch.equal(sample_rows_triton(logits, t, u, **kw), tok)}
    # Many draws at small V against the reference: tokens equal up to boundary rounding.
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(1, 300, generator=g).repeat(400, 1) * 2
    t = torch.full((400,), 0.9)
    u = torch.rand(400, generator=g).clamp(U_MIN, U_MAX)
    tok = sample_rows_triton(logits, t, u, chunk=32)
    out["many"] = {"tok": tok.tolist(), "ref": sample_rows_reference(logits, t, u).tolist(),
                   "ok": cdf_check(logits, t, u, tok)}
    out["chunk"] = CHUNK
    # Keyed launches: the kernel derives u from (key, step) as counter_uniform does and maps
    # t <= 0 to 1; the tokens equal an unkeyed launch fed those u and t, bit for bit.
    from orbit.rollout.sampling import counter_uniform

    g = torch.Generator().manual_seed(11)
    B, V = 64, 700
    logits = torch.randn(B, V, generator=g) * 3
    keys = torch.randint(0, 2**32, (B,), generator=g, dtype=torch.int64)
    keys[:4] = torch.tensor([0, 1, 2**32 - 1, 2**31])
    steps = torch.randint(0, 2**40, (B,), generator=g, dtype=torch.int64)  # > 2^32: masked
    t = 0.5 + torch.rand(B, generator=g)
    t[5] = 0.0  # a greedy row: counts as 1
    keyed = sample_rows_triton(logits, t, keys, chunk=64, steps=steps)
    u = counter_uniform(keys, steps)
    plain = sample_rows_triton(logits, torch.where(t > 0, t, torch.ones_like(t)), u, chunk=64)
    out["keyed"] = {"same": torch.equal(keyed, plain), "n": B}
    # The same launch with its log-probs (the engine's fast mode): the sampled rows' tokens are
    # the keyed launch's, the greedy row takes logits.argmax, and every log-prob is
    # log_softmax(logits / t)[token] (t = 1 for the greedy row) up to float32 summation order.
    t[9] = -1.0  # negative counts as greedy too
    tok_lp, lp = sample_rows_triton(logits, t, keys, chunk=64, steps=steps, logprobs=True)
    keyed = sample_rows_triton(logits, t, keys, chunk=64, steps=steps)
    tt = torch.where(t > 0, t, torch.ones_like(t))
    ref_lp = torch.log_softmax(logits / tt[:, None], -1).gather(1, tok_lp[:, None]).squeeze(1)
    sampled = t > 0
    out["logprobs"] = {
        "same_tokens": torch.equal(tok_lp[sampled], keyed[sampled]),
        "greedy_argmax": torch.equal(tok_lp[~sampled], logits[~sampled].argmax(-1)),
        "max_abs_err": float((lp - ref_lp).abs().max()), "finite": bool(lp.isfinite().all()),
        "dtype": str(lp.dtype)}
    print(json.dumps(out))


@pytest.fixture(scope="module")
def interp() -> dict:
    return run_in_interpreter(__file__)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_kernel_matches_reference(interp: dict, case: int) -> None:
    r = interp[str(case)]
    assert all(r["ok"]), ("kernel token outside its CDF interval", r)
    assert all(r["ref_ok"]), ("reference token outside its CDF interval", r)
    # Same rows, same u: a mismatch is a rounding boundary, so both still pass cdf_check.
    assert sum(a != b for a, b in zip(r["tok"], r["ref"])) <= max(1, len(r["tok"]) // 50), r


@pytest.mark.parametrize("case", range(len(CASES)))
def test_row_alone_and_repeated_give_the_same_token(interp: dict, case: int) -> None:
    assert interp[str(case)]["alone"] and interp[str(case)]["again"]


def test_many_draws_match_reference(interp: dict) -> None:
    r = interp["many"]
    assert all(r["ok"])
    assert sum(a != b for a, b in zip(r["tok"], r["ref"])) <= 2


def test_masked_rows_never_yield_a_masked_token(interp: dict) -> None:
    for i, (B, V, *_rest) in enumerate(CASES):
        if B < 3:
            continue
        tok = interp[str(i)]["tok"]
        assert tok[0] >= V // 3 and tok[1] < V // 2 and not V // 4 <= tok[2] < V // 2, (i, tok)


def test_reference_is_the_sampler_torch_path_on_cpu() -> None:
    """On CPU the reference picks the tokens `sample` picks for untruncated rows (searchsorted
    right vs left differs only where u * total equals a CDF value exactly)."""
    from orbit.kernels.sample import sample_rows_reference
    from orbit.rollout.sampling import counter_uniform, make_batch, sample, sequence_key
    from orbit.rollout.types import SamplingParams

    g = torch.Generator().manual_seed(3)
    B, V = 64, 1000
    logits = torch.randn(B, V, generator=g) * 2
    params = [SamplingParams(temperature=0.5 + i / B) for i in range(B)]
    b = make_batch(params, [sequence_key(9, i, 0) for i in range(B)], list(range(B)), V, "cpu")
    tok, _ = sample(logits, b)
    ref = sample_rows_reference(logits, b.temperature, counter_uniform(b.keys, b.steps))
    assert torch.equal(tok, ref)


def test_bad_inputs_are_named() -> None:
    from orbit.kernels.sample import sample_rows_reference, sample_rows_triton

    x = torch.randn(2, 10)
    with pytest.raises(ValueError, match="temperature"):
        sample_rows_reference(x, torch.ones(3), torch.rand(2))
    with pytest.raises(ValueError, match="u must be"):
        sample_rows_reference(x, torch.ones(2), torch.rand(2).double())
    with pytest.raises(ValueError, match=r"\[B, V\]"):
        sample_rows_reference(x[0], torch.ones(2), torch.rand(2))
    with pytest.raises(RuntimeError, match="CUDA"):
        sample_rows_triton(x, torch.ones(2), torch.rand(2))  # CPU tensors outside the interpreter


if __name__ == "__main__":
    _interpreter_main()


def test_keyed_launch_derives_the_sampler_uniform(interp: dict) -> None:
    """The engine's common path: u computed in the kernel from the counter keys and steps
    gives exactly the tokens of u computed by orbit.rollout.sampling.counter_uniform."""
    assert interp["keyed"]["same"], interp["keyed"]


def test_keyed_launch_returns_the_sampled_logprobs(interp: dict) -> None:
    """logprobs=True (what the engine's fast mode takes instead of a [B, V] log-softmax): the
    same tokens, greedy rows at their argmax, log-probs equal to torch's within float32."""
    r = interp["logprobs"]
    assert r["same_tokens"] and r["greedy_argmax"] and r["finite"], r
    assert r["max_abs_err"] < 1e-5 and r["dtype"] == "torch.float32", r
