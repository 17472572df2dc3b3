"""Module constants set from a benchmark's command line (`--knob MODULE.NAME=V1,V2,...` swept
over runs, `--set MODULE.NAME=V` fixed for the whole process), so a heuristic's constant can be
compared across runs of one process without a flag of its own."""

from __future__ import annotations


def knob_values(spec: str | None) -> list[str | None]:
    """--knob MODULE.NAME=V1,V2: one 'MODULE.NAME=V' per value (None: no knob, one run). The
    values are read as one Python list literal, so a value may be a tuple:
    NAME=('int4',),('int4','nvfp4') is two runs."""
    if not spec:
        return [None]
    import ast

    name, sep, vals = spec.partition("=")
    try:
        values = ast.literal_eval(f"[{vals}]") if sep and "." in name and vals else None
    except (ValueError, SyntaxError):
        values = None
    if not values:
        raise SystemExit(f"--knob: {spec!r} is not MODULE.NAME=V1,V2,... (Python literals)")
    return [f"{name}={v!r}" for v in values]


def set_knob(kv: str | None) -> None:
    """Set one module constant (knob_values' form), checking that it exists."""
    if kv is None:
        return
    import ast
    import importlib

    name, _, val = kv.partition("=")
    mod_name, _, attr = name.rpartition(".")
    mod = importlib.import_module(mod_name)
    if not hasattr(mod, attr):
        raise SystemExit(f"--knob: {mod_name} has no {attr}")
    setattr(mod, attr, ast.literal_eval(val))


def fixed_knob(spec: str, flag: str = "--set") -> str:
    """`flag` MODULE.NAME=V: the one 'MODULE.NAME=V' of a single-value spec (knob_values'
    form), checked like --knob's; several values are an error (a sweep needs one process per
    value, or a script's --knob sweep)."""
    values = knob_values(spec)
    if len(values) != 1:
        raise SystemExit(f"{flag}: {spec!r} has {len(values)} values; one per process")
    return values[0]
