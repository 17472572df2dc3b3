"""Every Triton kernel and jit helper in orbit/kernels reads only globals the GPU compiler
accepts: other jit functions, `tl.constexpr` values, modules and Triton's own objects. Triton
rejects a plain int/float/str/tuple global read inside jit code at compile time on the device,
while the CPU interpreter (what CI runs the kernels under) accepts it silently; session 14
found one (`UNPACK_PLANE_PAIRS` in `_qgemm_main`) that would have failed every INT4 `tl.dot`
launch. This walks each jit function's source and checks every global name it reads."""

from __future__ import annotations

import ast
import builtins
import importlib
import inspect
import pkgutil
import textwrap
import types

import pytest

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import orbit.kernels  # noqa: E402


def _jit_functions() -> list[tuple[str, JITFunction]]:
    out = []
    for info in pkgutil.iter_modules(orbit.kernels.__path__):
        mod = importlib.import_module(f"orbit.kernels.{info.name}")
        for name, obj in vars(mod).items():
            if isinstance(obj, JITFunction) and obj.fn.__module__ == mod.__name__:
                out.append((f"{mod.__name__}.{name}", obj))
    return out


def _accepted(value: object) -> bool:
    if isinstance(value, (JITFunction, tl.constexpr, types.ModuleType)):
        return True
    mod = getattr(value, "__module__", None) or ""
    # Triton's language objects (tl.load, dtypes, builtins such as tl.static_range)
    return mod.startswith("triton") or value in (None, True, False)


def test_jit_code_reads_only_compiler_visible_globals() -> None:
    bad = []
    fns = _jit_functions()
    assert len(fns) > 50  # (the walk found the kernels)
    for qual, jf in fns:
        fn = jf.fn
        # (the source Triton captured at decoration, not the file as it is now)
        tree = ast.parse(textwrap.dedent(getattr(jf, "src", None) or inspect.getsource(fn)))
        local = {a.arg for a in ast.walk(tree) if isinstance(a, ast.arg)}
        local |= {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)
                  and isinstance(n.ctx, ast.Store)}
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)):
                continue
            name = node.id
            if name in local or name == fn.__name__ or hasattr(builtins, name):
                continue
            if name not in fn.__globals__:
                bad.append(f"{qual}: {name} (undefined)")
            elif not _accepted(fn.__globals__[name]):
                bad.append(f"{qual}: {name} = {fn.__globals__[name]!r} "
                           f"({type(fn.__globals__[name]).__name__}; wrap it in tl.constexpr)")
    assert not bad, "\n".join(bad)
