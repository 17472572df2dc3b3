"""`python -m orbit <subcommand>`: one front door to the entrypoints that exist."""

from __future__ import annotations

import importlib
import importlib.util
import sys

# subcommand -> (module with a `main(argv)` function, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("orbit.entrypoints.train", "RL post-training (GRPO family) with a frozen base + adapter"),
    "generate": ("orbit.entrypoints.generate", "sample completions from a prompt file with the native engine"),
    "preflight": ("orbit.entrypoints.preflight", "check train-vs-rollout log-prob parity before a run"),
    "tune-qmm": ("orbit.entrypoints.tune_qmm", "measure the quantized-matmul kernel per shape on this GPU; write a route table"),
    "tasks": ("orbit.data.tasks", "write train/test JSONL for the built-in tasks"),
}


def _exists(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # the parent package is not built
        return False


def _available() -> dict[str, tuple[str, str]]:
    return {k: v for k, v in SUBCOMMANDS.items() if _exists(v[0])}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmds = _available()
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m orbit <subcommand> [args]\n\nsubcommands:")
        for name, (_, help_) in cmds.items():
            print(f"  {name:<10} {help_}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in cmds:
        print(f"unknown subcommand {name!r}; available: {', '.join(cmds)}", file=sys.stderr)
        return 2
    mod = importlib.import_module(cmds[name][0])
    rc = mod.main(rest)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
