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


def patch_interpreter(*, bf16_dot: bool = False, bf16_round: bool = False) -> None:
    """Work around the interpreter defects listed in the module docstring (subprocess only)."""
    import numpy as np
    import torch
    import triton.language as tl
    from triton.runtime import interpreter as interp

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
