"""Command-line entrypoints (train, preflight, generate, quantize), each with `main(argv)`."""
