"""Where step metrics go: a JSONL file in the run dir, the console (with ETA), W&B, a PNG plot.

Metric names follow slime/verl (`rollout/reward_mean`, `train/pg_loss`, `perf/...`) so
dashboards built for those frameworks read Orbit runs too. Values must be plain floats/ints:
workers reduce tensors before they get here.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from rich.console import Console

# what the console line shows, in order (when present)
CONSOLE_KEYS = (
    ("rollout/reward_mean", "reward", "{:.3f}"),
    ("rollout/response_len_mean", "len", "{:.0f}"),
    ("train/pg_loss", "pg", "{:+.4f}"),
    ("train/kl", "kl", "{:.4f}"),
    ("train/grad_norm", "|g|", "{:.3f}"),
    ("train/train_rollout_logprob_abs_diff_mean", "lp_diff", "{:.2e}"),
    ("eval/pass@1", "pass@1", "{:.3f}"),
    ("perf/step_time", "s/step", "{:.1f}"),
)


def wandb_enabled(setting: str, home: str | None = None) -> bool:
    """`auto` = on when $HOME/.wandb_key exists; `0`/`1` force it."""
    if setting not in ("auto", "0", "1"):
        raise ValueError(f"--use-wandb must be auto, 0 or 1, got {setting!r}")
    if setting == "auto":
        return (Path(home or os.path.expanduser("~")) / ".wandb_key").is_file()
    return setting == "1"


class MetricsLogger:
    """Append-only step metrics: JSONL always, console always, W&B when enabled."""

    def __init__(self, run_dir: str | Path, total_steps: int, *, use_wandb: bool = False,
                 wandb_project: str = "orbit", wandb_mode: str = "offline", run_name: str = "",
                 config: dict[str, Any] | None = None, console: Console | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        self.total_steps = total_steps
        self.console = console or Console(stderr=True)
        self._t0 = time.perf_counter()
        self._steps_done = 0
        self._wandb = None
        if use_wandb:
            try:
                import wandb
            except ImportError as e:
                raise ValueError("--use-wandb 1 needs the wandb package: pip install wandb") from e
            self._wandb = wandb.init(project=wandb_project, mode=wandb_mode,
                                     name=run_name or self.run_dir.name, dir=str(self.run_dir),
                                     config=config or {})

    def truncate_after(self, step: int) -> None:
        """On resume, drop lines of steps after `step` (they were logged but not checkpointed)."""
        if not self.path.is_file():
            return
        keep = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= step]
        self.path.write_text("".join(k + "\n" for k in keep))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            if not isinstance(v, (int, float)):
                raise TypeError(f"metric {k!r} must be a number, got {type(v).__name__}")
        record = {"step": step, **metrics}
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)
        self._steps_done += 1
        self.console.print(self._line(step, metrics), highlight=False)

    def _line(self, step: int, metrics: dict[str, float]) -> str:
        parts = [f"[bold]step {step}/{self.total_steps}[/bold]"]
        for key, short, fmt in CONSOLE_KEYS:
            if key in metrics and math.isfinite(metrics[key]):
                parts.append(f"{short} {fmt.format(metrics[key])}")
        elapsed = time.perf_counter() - self._t0
        left = max(self.total_steps - step, 0)
        eta = elapsed / max(self._steps_done, 1) * left
        parts.append(f"ETA {_hms(eta)}")
        return " | ".join(parts)

    def close(self, plot: bool = True) -> Path | None:
        if self._wandb is not None:
            self._wandb.finish()
        return plot_curves(self.path, self.run_dir / "curves.png") if plot else None


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_curves(metrics_path: str | Path, out: str | Path) -> Path | None:
    """Reward (and eval pass@k when logged) against step, as a PNG; None when nothing to plot."""
    rows = read_metrics(metrics_path) if Path(metrics_path).is_file() else []
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display on training nodes
    import matplotlib.pyplot as plt

    eval_keys = sorted({k for r in rows for k in r if k.startswith("eval/pass@")})
    fig, axes = plt.subplots(1, 1 + bool(eval_keys), figsize=(6 + 5 * bool(eval_keys), 4),
                             squeeze=False)
    ax = axes[0][0]
    pts = [(r["step"], r["rollout/reward_mean"]) for r in rows if "rollout/reward_mean" in r]
    if pts:
        ax.plot(*zip(*pts), marker="o", ms=3, label="reward mean")
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.set_title("rollout reward")
    ax.grid(alpha=0.3)
    if eval_keys:
        ax2 = axes[0][1]
        for k in eval_keys:
            e = [(r["step"], r[k]) for r in rows if k in r]
            ax2.plot(*zip(*e), marker="o", ms=3, label=k.removeprefix("eval/"))
        ax2.set_xlabel("step")
        ax2.set_title("eval")
        ax2.legend()
        ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return Path(out)
