"""Running Triton kernels on CPU for tests: Triton's interpreter in a subprocess.

`TRITON_INTERPRET=1` must be set before any kernel is decorated and must not leak into GPU
tests of the same pytest process, so a test file runs itself as a script
(`run_in_interpreter(__file__)`), its `__main__` computes results and prints one JSON dict as
its last line. Defects of Triton 3.6's interpreter with numpy >= 2.3 that `patch_interpreter`
works around (in the subprocess, never in orbit):
- `int()` of a one-element array (loop bounds) fails;
- bf16 `tl.dot` multiplies the raw uint16 bits (`bf16_dot=True` widens to fp32 first);
- the fp32 -> bf16 cast truncates (`bf16_round=True` rounds to nearest even, as the GPU does).
Its fp32 -> e4m3 cast also mis-rounds values that carry into the next binade (not patched:
activation quantization is checked bit for bit only on the GPU).
It also reads and writes any host address a kernel computes. `patch_interpreter` therefore
checks every unmasked load, store and atomic against the storages of the launch's tensor
arguments (`bounds=True`, the default). An access outside them fails the run and names the
kernel. On a GPU such an access may fault, or read a neighbour's bytes without a sign. The
check is by storage, not by view: a lane that runs off a view into a larger storage passes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def run_in_interpreter(script: str, timeout: int = 600) -> Any:
    """Run `script` (a test file whose __main__ prints a JSON value last) under the Triton
    interpreter; returns the parsed JSON. Fails the test with the subprocess's stderr."""
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join((str(ROOT), str(ROOT / "tests")))}
    proc = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _check_bounds(interp: Any) -> None:
    """Make every unmasked memory access of an interpreted kernel fall inside the storage of
    one of its tensor arguments, or raise naming the kernel (module docstring)."""
    import numpy as np

    launch: dict[str, Any] = {"ranges": np.zeros((0, 2), dtype=np.uint64), "name": "?"}
    orig_init = interp.GridExecutor._init_args_hst

    def init_args(self, args_dev, kwargs):
        args_hst, kwargs_hst = orig_init(self, args_dev, kwargs)
        spans = set()

        def collect(a):
            if isinstance(a, tuple):
                for v in a:
                    collect(v)
            elif hasattr(a, "untyped_storage"):
                st = a.untyped_storage()
                spans.add((st.data_ptr(), st.data_ptr() + st.nbytes()))

        for a in (*args_hst, *kwargs_hst.values()):
            collect(a)
        launch["ranges"] = np.array(sorted(spans), dtype=np.uint64).reshape(-1, 2)
        launch["name"] = getattr(self.fn, "__name__", "?")
        return args_hst, kwargs_hst

    def check(ptrs, mask, nbytes: int, what: str) -> None:
        addr = np.asarray(ptrs.data).astype(np.uint64)
        if mask is not None:  # the active lanes only
            addr = addr[np.broadcast_to(np.asarray(mask.data, dtype=bool), addr.shape)]
        addr = addr.reshape(-1)
        if addr.size == 0:
            return
        r = launch["ranges"]
        i = np.searchsorted(r[:, 0], addr, side="right") - 1  # the last storage starting <= addr
        ok = (i >= 0) & (addr + np.uint64(nbytes) <= r[np.maximum(i, 0), 1])
        if not ok.all():
            bad = int(addr[~ok][0])
            raise AssertionError(
                f"{launch['name']}: {what} of {nbytes} bytes at {bad:#x}, outside every tensor "
                f"argument's storage ({int((~ok).sum())} of {addr.size} active lanes)")

    def elem_bytes(ptrs) -> int:
        return np.dtype(interp._get_np_dtype(ptrs.get_element_ty())).itemsize

    orig_load = interp.InterpreterBuilder.create_masked_load
    orig_store = interp.InterpreterBuilder.create_masked_store
    orig_rmw = interp.InterpreterBuilder.create_atomic_rmw
    orig_cas = interp.InterpreterBuilder.create_atomic_cas

    def load(self, ptrs, mask, other, cache_policy, is_volatile):
        check(ptrs, mask, elem_bytes(ptrs), "load")
        return orig_load(self, ptrs, mask, other, cache_policy, is_volatile)

    def store(self, ptrs, value, mask, cache_policy):
        check(ptrs, mask, elem_bytes(ptrs), "store")
        return orig_store(self, ptrs, value, mask, cache_policy)

    def rmw(self, rmw_op, ptr, val, mask, sem, scope):
        check(ptr, mask, elem_bytes(ptr), "atomic")
        return orig_rmw(self, rmw_op, ptr, val, mask, sem, scope)

    def cas(self, ptr, cmp, val, sem, scope):
        check(ptr, None, elem_bytes(ptr), "atomic cas")
        return orig_cas(self, ptr, cmp, val, sem, scope)

    interp.GridExecutor._init_args_hst = init_args
    interp.InterpreterBuilder.create_masked_load = load
    interp.InterpreterBuilder.create_masked_store = store
    interp.InterpreterBuilder.create_atomic_rmw = rmw
    interp.InterpreterBuilder.create_atomic_cas = cas


def patch_interpreter(*, bf16_dot: bool = False, bf16_round: bool = False,
                      bounds: bool = True) -> None:
    """Work around the interpreter defects listed in the module docstring (subprocess only),
    and (bounds) check every memory access against the launch's tensor arguments."""
    import numpy as np
    import torch
    import triton.language as tl
    from triton.runtime import interpreter as interp

    if bounds:
        _check_bounds(interp)

    orig_patch = interp._patch_lang_tensor

    def patch(tensor, scope):  # numpy 2.x refuses int() of a shape-(1,) array
        orig_patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interp._patch_lang_tensor = patch
    if bf16_dot:
        orig_dot = interp.InterpreterBuilder.create_dot

        def dot(self, a, b, d, *args):  # bf16 is stored as uint16 bits: widen to fp32 first
            def f32(h):
                if h.dtype.scalar == tl.bfloat16:
                    return interp.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32),
                                               tl.float32)
                return h
            return orig_dot(self, f32(a), f32(b), d, *args)

        interp.InterpreterBuilder.create_dot = dot
    if bf16_round:
        orig_cast = interp.InterpreterBuilder.cast_impl

        def cast_impl(self, src, dst_type):  # fp32 -> bf16 rounds to nearest even
            if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
                t = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32))
                bits = t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
                return interp.TensorHandle(bits, tl.bfloat16)
            return orig_cast(self, src, dst_type)

        interp.InterpreterBuilder.cast_impl = cast_impl
        interp.InterpreterBuilder.create_fp_trunc = cast_impl


def print_kernel_and_model_results(kernel_cases: Any, model_checks: Any) -> None:
    """The `__main__` of a test file whose interpreter run is a dict of kernel cases plus a
    "model" entry: patches the interpreter (bf16 dot and rounding), runs both, prints JSON."""
    patch_interpreter(bf16_dot=True, bf16_round=True)
    out = kernel_cases()
    out["model"] = model_checks()
    print(json.dumps(out))
