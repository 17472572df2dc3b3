"""Shim so that `python -m orbit.train ...` works (the CLI lives in orbit.entrypoints.train)."""

from __future__ import annotations

import sys

from orbit.entrypoints.train import main

if __name__ == "__main__":
    sys.exit(main())
