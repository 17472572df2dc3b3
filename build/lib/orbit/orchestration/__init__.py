"""Ray placement, the worker-group wrapper and the driver loop (the only Ray users in Orbit)."""
