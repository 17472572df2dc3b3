"""`python -m orbit tune-qmm`: measure which quantized-matmul kernel and tile each of a model's
linear shapes should run on this GPU, and write the route table fast mode then follows
(orbit/kernels/qmm_routes.py; the search: orbit/kernels/qmm_tune.py).

    python -m orbit tune-qmm --model qwen3-1.7b --formats int4,fp8 --out routes-h200.json
    QMM_ROUTES=routes-h200.json bash examples/...   # or ORBIT_QMM_ROUTES=... for any process

--model: a preset (qwen3-1.7b, qwen3-4b, qwen3-8b, smollm2-135m), a HF model directory or its
config.json, a .gguf file, or "default" (the embedded SmolLM2-135M GGUF); --shapes INxOUT,...
instead tunes those weight shapes alone. Prints one row per (format, shape, M): the rules'
route and time, the chosen one, cuBLAS BF16 on the same shape in the same run, and the
fraction of device copy bandwidth. Needs a CUDA GPU. Bad flags: one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import NoReturn

PROG = "orbit tune-qmm"
FORMATS = ("int4", "int8", "fp8", "nvfp4", "mxfp4")


def presets() -> dict[str, dict]:
    """Model shapes by name (HF config fields), for tuning without a checkpoint at hand."""
    q3 = {"architectures": ["Qwen3ForCausalLM"], "vocab_size": 151936, "head_dim": 128,
          "rope_theta": 1e6, "rms_norm_eps": 1e-6, "max_position_embeddings": 40960}
    return {
        "qwen3-1.7b": {**q3, "hidden_size": 2048, "intermediate_size": 6144,
                       "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8},
        "qwen3-4b": {**q3, "hidden_size": 2560, "intermediate_size": 9728,
                     "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8},
        "qwen3-8b": {**q3, "hidden_size": 4096, "intermediate_size": 12288,
                     "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8},
        "smollm2-135m": {"architectures": ["LlamaForCausalLM"], "vocab_size": 49152,
                         "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                         "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
                         "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
                         "max_position_embeddings": 8192},
    }


def model_config(spec: str):  # -> ModelConfig
    """ModelConfig for --model (ValueError naming what is wrong)."""
    from orbit.models.config import ModelConfig

    if spec in presets():
        return ModelConfig.from_hf_dict(presets()[spec])
    if spec == "default":
        from orbit.assets import default_gguf_path

        spec = str(default_gguf_path())
    p = Path(spec)
    if p.is_dir():
        return ModelConfig.from_pretrained_dir(p)
    if p.suffix == ".json" and p.is_file():
        try:
            return ModelConfig.from_hf_dict(json.loads(p.read_text()))
        except json.JSONDecodeError as e:
            raise ValueError(f"--model {p}: line {e.lineno}: not valid JSON ({e.msg})") from None
    if p.suffix == ".gguf" and p.is_file():
        from orbit.models.gguf_loader import config_from_gguf
        from orbit.quant.gguf import GGUFReader

        reader = GGUFReader(str(p))
        return config_from_gguf(reader, {t.name for t in reader.tensors})
    raise ValueError(f"--model {spec!r}: not a preset ({', '.join(presets())}), 'default', a "
                     "model directory, a config.json or a .gguf file")


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    """'2048x6144,6144x2048' (in x out) -> [(n=out, k=in, any M)]."""
    out = []
    for item in text.split(","):
        try:
            k, n = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise ValueError(f"--shapes: {item!r} is not INxOUT (two integers)") from None
        if k <= 0 or n <= 0:
            raise ValueError(f"--shapes: {item!r} has a non-positive dimension")
        out.append((n, k, 1 << 30))
    return out


def _ints(text: str, flag: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag}: {text!r} is not a comma-separated list of integers") from None
    if not vals or min(vals) < 1:
        raise ValueError(f"{flag}: needs positive integers, got {text!r}")
    return sorted(set(vals))


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"{PROG}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    from orbit.kernels.qmm_tune import DEFAULT_M

    ap = _Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen3-1.7b", help="preset, model dir, config.json, .gguf "
                    "or 'default' (the embedded SmolLM2 GGUF)")
    ap.add_argument("--shapes", default="", help="INxOUT,... weight shapes instead of --model's")
    ap.add_argument("--formats", default="int4,fp8,nvfp4", help=f"comma-separated, of {FORMATS}")
    ap.add_argument("--m", default=",".join(map(str, DEFAULT_M)),
                    help="row counts to tune (each covers M from the next smaller one up)")
    ap.add_argument("--int4-group", type=int, default=128, help="group size of int4/int8 weights")
    ap.add_argument("--grid", default="quick", choices=("quick", "full", "regfed"),
                    help="how many tl.dot tiles to try (regfed: only the register-fed "
                         "plane-pair tiles besides the rules' route, dequant and the GEMV)")
    ap.add_argument("--min-gain", type=float, default=0.03,
                    help="a route replaces the rules' only when this much faster (fraction)")
    ap.add_argument("--out", default="", help="route table to write (default "
                    "qmm-routes-<device>.json here)")
    ap.add_argument("--update", action="store_true", help="keep --out's existing routes at the "
                    "(format, shape, M) this run does not measure (tune formats, shapes or "
                    "row counts in separate runs into one table)")
    ap.add_argument("--no-bf16", action="store_true", help="skip the cuBLAS BF16 baseline rows")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        formats = [f for f in args.formats.split(",") if f]
        bad = [f for f in formats if f not in FORMATS]
        if bad or not formats:
            raise ValueError(f"--formats: {bad or args.formats!r} not among {FORMATS}")
        ms = _ints(args.m, "--m")
        shapes = (parse_shapes(args.shapes) if args.shapes else None)
        if shapes is None:
            from orbit.kernels.qmm_tune import model_shapes

            shapes = model_shapes(model_config(args.model))
        if not 0 <= args.min_gain < 1:
            raise ValueError(f"--min-gain must be in [0, 1), got {args.min_gain}")
        import torch

        if not torch.cuda.is_available():
            raise ValueError("tune-qmm times kernels on a CUDA GPU; none is visible here")
    except ValueError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    return run(args, formats, ms, shapes)


def run(args: argparse.Namespace, formats: list[str], ms: list[int],
        shapes: list[tuple[int, int, int]]) -> int:
    import torch

    from orbit.kernels.qmm_routes import device_name, device_slug, load_routes, save_routes
    from orbit.kernels.qmm_tune import (
        ShapeResult,
        describe,
        graph_timer,
        l2_copies,
        tune,
        weight_maker,
    )

    device = torch.device("cuda", torch.cuda.current_device())
    name = device_name(device)
    timer = graph_timer()
    copies = l2_copies(device)
    bw = _copy_gbs()
    bf16: dict[tuple[int, int, int], float] = {}
    rows: list[str] = []

    def log(r: ShapeResult) -> None:
        if not args.no_bf16 and (r.n, r.k, r.m) not in bf16:
            bf16[(r.n, r.k, r.m)] = _bf16_seconds(r.n, r.k, r.m, copies, timer)
        t_rules = r.rules.seconds or float("nan")
        t = r.best.seconds if r.chosen == r.best.route else t_rules
        base = bf16.get((r.n, r.k, r.m))
        gbs = (r.weight_bytes + 2 * r.m * (r.n + r.k)) / t / 1e9
        line = (f"{r.fmt:6s} {r.k:>6d}x{r.n:<6d} M={r.m:<4d} rules {describe(r.rules.route):24s} "
                f"{t_rules * 1e6:8.2f} us -> {describe(r.chosen):24s} {t * 1e6:8.2f} us "
                f"({t_rules / t:4.2f}x)" + (f"  bf16 {base * 1e6:8.2f} us ({base / t:4.2f}x)"
                                             if base else "") + f"  {gbs / bw:4.0%} of copy")
        print(line, flush=True)
        rows.append(line)
        failed = [c for c in r.candidates if c.seconds is None]
        if failed:  # (why they were skipped, once per shape instead of the compiler's spew)
            print(f"       {len(failed)} of {len(r.candidates)} candidates not timed, e.g. "
                  f"{describe(failed[0].route)}: {failed[0].note}", flush=True)

    table, results = tune(shapes, formats, ms, weight_maker(device, args.int4_group), copies, timer,
                    device, args.grid, args.min_gain, log)
    out = Path(args.out or f"qmm-routes-{device_slug(name)}.json")
    if args.update and out.is_file():
        kept = merge_routes(table, load_routes(out))
        print(f"kept {kept} route(s) of {out} that this run did not measure")
    save_routes(table, out, {"tool": PROG, "torch": torch.__version__, "triton": _triton_version(),
                             "date": datetime.date.today().isoformat(), "copy_GBps": round(bw, 1),
                             "grid": args.grid, "min_gain": args.min_gain})
    changed = sum(1 for r in results if r.chosen != r.rules.route)
    print(f"\n{len(rows)} (format, shape, M) measured on {name} (copy {bw:.0f} GB/s); "
          f"{changed} route(s) differ from the rules; table: {out}")
    return 0


def merge_routes(table, old) -> int:  # (RouteTable, RouteTable) -> routes kept
    """Add to `table` every route of `old` at a (fmt, n, k, row count) `table` has none of;
    returns how many. So runs over other formats, shapes or row counts (rollout batches after
    decode sizes, say) extend one table, and a re-measured row count replaces its old route.
    A table measured on another device is refused (ValueError)."""
    if old.device != table.device:
        raise ValueError(f"--update: {old.source} was measured on {old.device!r}, this run on "
                         f"{table.device!r}")
    kept = 0
    for key, routes in old.routes.items():
        measured = {m for m, _ in table.routes.get(key, [])}
        for m_max, route in routes:
            if m_max not in measured:
                table.add(*key, m_max, route, old.extra.get((*key, m_max)))
                kept += 1
    return kept


def _triton_version() -> str:
    import triton

    return triton.__version__


def _copy_gbs() -> float:
    """Device-to-device copy bandwidth (GB/s, bytes read + written): the roofline the rows
    report against (as scripts/bench/bench_qmm.py measures it)."""
    import torch
    from triton.testing import do_bench

    n = 1 << 28
    a = torch.empty(n, device="cuda", dtype=torch.bfloat16).normal_()
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a), warmup=5, rep=50, return_mode="median")
    return 2 * n * 2 / ms / 1e6


def _bf16_seconds(n: int, k: int, m: int, copies, timer) -> float:
    import torch

    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies(2 * n * k))]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    return timer([lambda w=w: x @ w.T for w in ws])


if __name__ == "__main__":
    sys.exit(main())
