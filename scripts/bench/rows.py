"""scripts/bench/rows.py: the JSON rows a benchmark prints (one object per line), as short
aligned text lines, so a device call's output tail holds many rows:

    python3 scripts/bench/bench_qmm.py ... | python3 scripts/bench/rows.py fmt path k n m cfg ms speedup frac_copy_bw

Fields named on the command line, in that order; `ms` is printed in microseconds (us), floats
to 3 significant digits; lines that are not JSON objects pass through unchanged.
"""

from __future__ import annotations

import json
import sys


def fmt_value(key: str, v: object) -> str:
    if key == "ms" and isinstance(v, float):
        return f"{v * 1e3:.1f}us"
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, list):
        return ",".join(str(e) for e in v)
    return str(v)


def main(argv: list[str]) -> int:
    keys = argv or ["path", "ms"]
    for line in sys.stdin:
        line = line.rstrip("\n")
        if not line.startswith("{"):
            print(line)
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            print(line)
            continue
        print(" ".join(f"{k}={fmt_value(k, row[k])}" for k in keys if k in row)
              + (f" error={row['error'][:80]}" if "error" in row else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
