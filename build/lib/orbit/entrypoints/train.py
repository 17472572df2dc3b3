"""`python -m orbit.train` / `python -m orbit train`: parse the flags, then run the driver.

Ray, torch models and data are only touched inside `main`, so `--help` is instant and the
launchers' dry runs can parse an argv without starting anything.
"""

from __future__ import annotations

import sys

from orbit.config import build_parser, config_from_namespace


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config_from_namespace(args)
    try:
        cfg.validate()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from orbit.orchestration.driver import train

    run_dir = train(cfg)
    print(f"run directory: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
