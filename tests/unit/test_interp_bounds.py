"""The interpreter's bounds check (tests/triton_interp.py, `patch_interpreter(bounds=True)`):
an unmasked load, store or atomic outside every tensor argument's storage fails the launch and
names the kernel; the same accesses inside, or masked off, pass. This is the check every
interpreted kernel test runs under (it found an FP8 GEMV preload reading before its scales)."""

from __future__ import annotations

import json

import pytest
import torch
from triton_interp import patch_interpreter, run_in_interpreter

triton = pytest.importorskip("triton")
# Lane offsets: in bounds, and far enough (256 KB) that no other argument's storage can be
# there. (The check is by storage, not view: a lane off a view into a larger storage passes.)
FAR = 1 << 16
SHIFTS = (0, -FAR, FAR)


def _interpreter_main() -> None:
    patch_interpreter()
    import triton.language as tl

    @triton.jit
    def _copy(x_ptr, y_ptr, cnt_ptr, shift, N, BLOCK: tl.constexpr, MASKED: tl.constexpr,
              OP: tl.constexpr):
        i = tl.arange(0, BLOCK)
        if OP == 0:  # load at i + shift
            if MASKED:
                v = tl.load(x_ptr + i + shift, mask=(i + shift >= 0) & (i + shift < N), other=0.0)
            else:
                v = tl.load(x_ptr + i + shift)
            tl.store(y_ptr + i, v)
        elif OP == 1:  # store at i + shift
            v = tl.load(x_ptr + i)
            if MASKED:
                tl.store(y_ptr + i + shift, v, mask=(i + shift >= 0) & (i + shift < N))
            else:
                tl.store(y_ptr + i + shift, v)
        else:  # atomic at shift
            tl.atomic_add(cnt_ptr + shift, 1)

    out = {}
    for op in (0, 1, 2):
        for shift in SHIFTS:
            for masked in (False, True):
                x, y, cnt = torch.arange(16.0), torch.zeros(16), torch.zeros(1, dtype=torch.int32)
                try:
                    _copy[(1,)](x, y, cnt, shift, 16, BLOCK=16, MASKED=masked, OP=op)
                    out[f"{op}{shift}{masked}"] = "ok"
                except Exception as e:  # noqa: BLE001  (the message is what the test reads)
                    out[f"{op}{shift}{masked}"] = str(e)
    print(json.dumps(out))


@pytest.fixture(scope="module")
def interp() -> dict:
    return run_in_interpreter(__file__)


@pytest.mark.parametrize("op", [0, 1])
@pytest.mark.parametrize("shift", SHIFTS)
def test_loads_and_stores(interp: dict, op: int, shift: int) -> None:
    assert interp[f"{op}{shift}True"] == "ok"  # masked off: never an access
    r = interp[f"{op}{shift}False"]
    if shift == 0:
        assert r == "ok"
    else:  # 16-float tensors, lanes 256 KB off: outside them (whatever the allocator did)
        assert "_copy" in r and "outside every tensor argument" in r, r
        assert ("load" if op == 0 else "store") in r, r


@pytest.mark.parametrize("shift,ok", [(0, True), (FAR, False), (-FAR, False)])
def test_atomic(interp: dict, shift: int, ok: bool) -> None:
    r = interp[f"2{shift}False"]
    assert (r == "ok") == ok, r
    if not ok:
        assert "atomic" in r


if __name__ == "__main__":
    _interpreter_main()
