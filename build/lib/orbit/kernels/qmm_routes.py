"""Measured routes for fast-mode quantized matmuls: which kernel (and tile) runs a forward of
M rows on an [n, k] weight of a format, per GPU model.

Why: fast mode routes by rules (`_qgemm.route`: the decode GEMV at M <= 4 on some shapes, the
`tl.dot` loop with `pick_config`'s tile by M, dequantize + cuBLAS from `_qgemm.dequant_min_m(fmt)` rows)
set from sweeps on one H100/H200 at a few shapes. At rollout batch sizes those rules are
the weak spot: a Qwen3-1.7B INT4 base decoded 21,194 tok/s at batch 256 where BF16 weights
gave 51,762 (docs/benchmarks.md, session 8), and the best route moves with the GPU and the
shape. So, as SGLang and vLLM do for their fused-MoE tiles, a table measured on the user's
GPU (`python -m orbit tune-qmm`, orbit/kernels/qmm_tune.py) names the route per
(format, n, k, M bucket), and fast mode follows it where it has an entry.

Reproducibility: routing never times anything at run time; the same table gives the same
kernels for a shape, so a seeded rollout repeats. Exact mode never reads a table (its tiles are
fixed for batch invariance), nor does the input gradient.

Which table serves a process (`RouteTables.table_for`): one installed explicitly
(`ROUTES.install`, what `--qmm-routes` / QMM_ROUTES does in the trainer and engine workers),
else the file named by the environment variable ORBIT_QMM_ROUTES ("off": none), else the table
shipped for the device in orbit/kernels/tuned/<device name>.json, else none (the rules).

File (JSON), one object:
    {"format": "orbit-qmm-routes", "version": 1, "device": "NVIDIA H200",
     "routes": [{"fmt": "int4", "n": 6144, "k": 2048, "m_max": 16, "kind": "dot",
                 "config": {"bm": 16, "bo": 64, "br": 128, "warps": 4, "stages": 4}}, ...]}
A route covers M from just above the next smaller m_max of its (fmt, n, k) up to its own
m_max; M beyond the largest m_max, and shapes without routes, follow the rules. Other fields
(measured times, who wrote it) are kept but not read.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from orbit.kernels.tile_config import UNPACK_PLANE_PAIRS, TileConfig

FILE_FORMAT = "orbit-qmm-routes"
FILE_VERSION = 1
ENV_VAR = "ORBIT_QMM_ROUTES"
SHIPPED_DIR = Path(__file__).parent / "tuned"
ROUTE_KINDS = ("dot", "dequant", "gemv")
ROUTE_FORMATS = ("int4", "int8", "fp8", "nvfp4", "mxfp4")
_CONFIG_FIELDS = {"bm", "bo", "br", "warps", "stages", "group_m", "unpack", "split", "swap"}


class RouteTableError(ValueError):
    """A route table that cannot be used; the message names the file, the entry and the field."""


@dataclass(frozen=True)
class Route:
    """`dot`: the fused `tl.dot` loop with `config`; `dequant`: the weight dequantized into a
    transient BF16 buffer, then cuBLAS; `gemv`: the decode GEMV (orbit/kernels/gemv.py, its
    own config pick)."""

    kind: str
    config: TileConfig | None = None


@dataclass
class RouteTable:
    """Routes by (fmt, n, k), each a list of (m_max, Route) sorted by m_max."""

    device: str
    routes: dict[tuple[str, int, int], list[tuple[int, Route]]] = field(default_factory=dict)
    source: str = "<memory>"
    extra: dict[tuple[str, int, int, int], dict[str, Any]] = field(default_factory=dict)

    def add(self, fmt: str, n: int, k: int, m_max: int, route: Route,
            info: dict[str, Any] | None = None) -> None:
        lst = self.routes.setdefault((fmt, n, k), [])
        if any(mm == m_max for mm, _ in lst):
            raise RouteTableError(f"{self.source}: two routes for {fmt} n={n} k={k} m_max={m_max}")
        lst.append((m_max, route))
        lst.sort(key=lambda e: e[0])
        if info:
            self.extra[(fmt, n, k, m_max)] = dict(info)

    def lookup(self, fmt: str, n: int, k: int, m: int) -> Route | None:
        """The route for m rows: the one with the smallest m_max >= m; None past them all."""
        for m_max, route in self.routes.get((fmt, n, k), ()):
            if m <= m_max:
                return route
        return None

    def to_json(self) -> dict[str, Any]:
        out = []
        for (fmt, n, k), lst in sorted(self.routes.items()):
            for m_max, r in lst:
                e: dict[str, Any] = {"fmt": fmt, "n": n, "k": k, "m_max": m_max, "kind": r.kind}
                if r.config is not None:
                    # swap and maxnreg are written only where set (older tables lack them)
                    e["config"] = {f: v for f, v in asdict(r.config).items()
                                   if f not in ("swap", "maxnreg") or v}
                e.update(self.extra.get((fmt, n, k, m_max), {}))
                out.append(e)
        return {"format": FILE_FORMAT, "version": FILE_VERSION, "device": self.device,
                "routes": out}


def save_routes(table: RouteTable, path: str | Path, meta: dict[str, Any] | None = None) -> None:
    """Write the table as JSON atomically (a temporary sibling, fsynced, then os.replace), so a
    reader never sees half a file."""
    path = Path(path)
    doc = table.to_json()
    if meta:
        doc["written_by"] = meta
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _int_field(e: dict[str, Any], name: str, where: str, lo: int = 1) -> int:
    v = e.get(name)
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise RouteTableError(f"{where}: field {name!r} must be an integer >= {lo}, got {v!r}")
    return v


def _pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def _parse_config(c: Any, where: str) -> TileConfig:
    if not isinstance(c, dict):
        raise RouteTableError(f"{where}: field 'config' must be an object with "
                              f"{sorted(_CONFIG_FIELDS)}, got {c!r}")
    unknown = set(c) - _CONFIG_FIELDS
    if unknown:
        raise RouteTableError(f"{where}: unknown config field(s) {sorted(unknown)} "
                              f"(known: {sorted(_CONFIG_FIELDS)})")
    vals = {}
    for name in ("bm", "bo", "br"):
        v = _int_field(c, name, where + ".config", 16)
        if not _pow2(v) or v > 512:
            raise RouteTableError(f"{where}.config: field {name!r} must be a power of two in "
                                  f"[16, 512], got {v}")
        vals[name] = v
    warps = _int_field(c, "warps", where + ".config")
    if warps not in (1, 2, 4, 8, 16):
        raise RouteTableError(f"{where}.config: field 'warps' must be 1, 2, 4, 8 or 16, got {warps}")
    stages = _int_field(c, "stages", where + ".config")
    if stages > 8:
        raise RouteTableError(f"{where}.config: field 'stages' must be in [1, 8], got {stages}")
    group_m = _int_field(c, "group_m", where + ".config") if "group_m" in c else 8
    unpack = c.get("unpack", -1)
    if unpack not in (-1, 0, 1, 2, UNPACK_PLANE_PAIRS):
        raise RouteTableError(f"{where}.config: field 'unpack' must be -1, 0, 1, 2 or "
                              f"{UNPACK_PLANE_PAIRS} (int4 / nvfp4 plane pairs), got {unpack!r}")
    split = _int_field(c, "split", where + ".config") if "split" in c else 1
    if split > 16:
        raise RouteTableError(f"{where}.config: field 'split' must be in [1, 16], got {split}")
    swap = c.get("swap", False)
    if not isinstance(swap, bool):
        raise RouteTableError(f"{where}.config: field 'swap' must be true or false, got {swap!r}")
    return TileConfig(warps=warps, stages=stages, group_m=group_m, unpack=unpack, split=split,
                      swap=swap, **vals)


def parse_routes(doc: Any, source: str) -> RouteTable:
    """A RouteTable from a parsed JSON document; RouteTableError names what is wrong."""
    from orbit.kernels._qgemm import GEMV_MAX_M  # the kernels import this module

    if not isinstance(doc, dict) or doc.get("format") != FILE_FORMAT:
        raise RouteTableError(f"{source}: not an Orbit route table (expected a JSON object with "
                              f"\"format\": \"{FILE_FORMAT}\")")
    if doc.get("version") != FILE_VERSION:
        raise RouteTableError(f"{source}: field 'version' is {doc.get('version')!r}; this Orbit "
                              f"reads version {FILE_VERSION}")
    device = doc.get("device")
    if not isinstance(device, str) or not device:
        raise RouteTableError(f"{source}: field 'device' must name the GPU the table was "
                              f"measured on, got {device!r}")
    entries = doc.get("routes")
    if not isinstance(entries, list):
        raise RouteTableError(f"{source}: field 'routes' must be a list, got {type(entries).__name__}")
    table = RouteTable(device=device, source=source)
    for i, e in enumerate(entries):
        where = f"{source}: routes[{i}]"
        if not isinstance(e, dict):
            raise RouteTableError(f"{where}: must be an object, got {e!r}")
        fmt = e.get("fmt")
        if fmt not in ROUTE_FORMATS:
            raise RouteTableError(f"{where}: field 'fmt' must be one of {ROUTE_FORMATS}, got {fmt!r}")
        n, k, m_max = (_int_field(e, f, where) for f in ("n", "k", "m_max"))
        kind = e.get("kind")
        if kind not in ROUTE_KINDS:
            raise RouteTableError(f"{where}: field 'kind' must be one of {ROUTE_KINDS}, got {kind!r}")
        if kind == "dot":
            route = Route("dot", _parse_config(e.get("config"), where))
            problem = route.config.pairs_problem(fmt)
            if problem:
                raise RouteTableError(f"{where}: config {problem}")
        else:
            if "config" in e:
                raise RouteTableError(f"{where}: field 'config' belongs to kind 'dot' only "
                                      f"(this route is {kind!r})")
            if kind == "gemv" and m_max > GEMV_MAX_M:
                raise RouteTableError(f"{where}: kind 'gemv' serves at most {GEMV_MAX_M} rows, "
                                      f"got m_max={m_max}")
            route = Route(kind)
        info = {f: v for f, v in e.items()
                if f not in ("fmt", "n", "k", "m_max", "kind", "config")}
        try:
            table.add(fmt, n, k, m_max, route, info)
        except RouteTableError as err:
            raise RouteTableError(f"{where}: {err}") from None
    return table


def load_routes(path: str | Path) -> RouteTable:
    """Read and check a route table file (RouteTableError names the file, entry and field)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise RouteTableError(f"{path}: cannot read the route table ({e.strerror or e})") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise RouteTableError(f"{path}: line {e.lineno}, column {e.colno}: not valid JSON "
                              f"({e.msg})") from None
    return parse_routes(doc, str(path))


def device_slug(name: str) -> str:
    """'NVIDIA H200' -> 'nvidia_h200': the shipped table's file stem for a device name."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def device_name(device: torch.device) -> str:
    if device.type != "cuda":
        return device.type
    return torch.cuda.get_device_name(device)


class RouteTables:
    """Which route table serves each device of this process. One instance, `ROUTES`, is read
    by `_qgemm.route`: process-wide on purpose, as Triton's own kernel cache is, because the
    choice belongs to the GPU the process runs on, not to any one module."""

    def __init__(self) -> None:
        self._installed: RouteTable | None = None
        self._explicit = False
        self._by_device: dict[str, RouteTable | None] = {}

    def install(self, table: RouteTable | None) -> None:
        """Serve every device of this process from `table` (None: the rules only), whatever
        the environment and the shipped tables say."""
        self._installed, self._explicit = table, True
        self._by_device.clear()

    def reset(self) -> None:
        """Back to the default resolution (environment variable, then shipped table)."""
        self._installed, self._explicit = None, False
        self._by_device.clear()

    @contextmanager
    def scoped(self, table: RouteTable | None) -> Iterator[None]:
        """Serve every device from `table` inside (None: the rules only), then whatever served
        before (the tuner forces one candidate at a time this way)."""
        saved = (self._installed, self._explicit, dict(self._by_device))
        self.install(table)
        try:
            yield
        finally:
            self._installed, self._explicit = saved[0], saved[1]
            self._by_device.clear()
            self._by_device.update(saved[2])

    def table_for(self, device: torch.device) -> RouteTable | None:
        if self._explicit:
            return self._installed
        key = f"{device.type}:{device.index}"
        if key not in self._by_device:
            self._by_device[key] = self._resolve(device)
        return self._by_device[key]

    def lookup(self, device: torch.device, fmt: str, n: int, k: int, m: int) -> Route | None:
        table = self.table_for(device)
        return None if table is None else table.lookup(fmt, n, k, m)

    @staticmethod
    def _resolve(device: torch.device) -> RouteTable | None:
        env = os.environ.get(ENV_VAR, "").strip()
        if env.lower() in ("off", "0", "none"):
            return None
        name = device_name(device)
        if env:
            try:
                table = load_routes(env)
            except RouteTableError as e:
                raise RouteTableError(f"{ENV_VAR}={env}: {e}") from None
            if table.device != name:
                warnings.warn(f"{ENV_VAR}: the route table {env} was measured on "
                              f"{table.device!r}, this is {name!r}; using it anyway",
                              stacklevel=3)
            return table
        shipped = SHIPPED_DIR / f"{device_slug(name)}.json"
        return load_routes(shipped) if shipped.is_file() else None


ROUTES = RouteTables()


def install_from_path(path: str | Path | None) -> RouteTable | None:
    """The trainer/engine workers' entry (`--qmm-routes`): install the table at `path` for this
    process; empty or None keeps the default resolution."""
    if not path:
        return None
    table = load_routes(path)
    ROUTES.install(table)
    return table
