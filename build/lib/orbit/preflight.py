"""Shim so that `python -m orbit.preflight ...` works (the CLI lives in orbit.entrypoints.preflight)."""

from __future__ import annotations

import sys

from orbit.entrypoints.preflight import main

if __name__ == "__main__":
    sys.exit(main())
