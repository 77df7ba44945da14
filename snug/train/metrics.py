"""Where training metrics go: metrics.jsonl, TensorBoard (when installed) and loss.png."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from snug.runtime.files import write_text_atomic


class MetricsLog:
    """`keep_until`: a resumed run keeps the rows of steps up to its checkpoint's and drops
    later ones (they are trained again); TensorBoard purges them likewise."""

    def __init__(self, out_dir: Path, keep_until: int | None = None) -> None:
        self.path = out_dir / "metrics.jsonl"
        self.rows: list[dict] = []
        if keep_until is not None and self.path.exists():
            text = self.path.read_bytes().decode("utf-8", errors="replace")
            for line in text.splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a kill, or damaged
                    continue
                if (
                    isinstance(row, dict)
                    and isinstance(row.get("step", 0), int)
                    and row.get("step", 0) <= keep_until
                ):
                    self.rows.append(row)
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in self.rows))
        self.tb = None
        if importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if keep_until is None else keep_until + 1
            self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=purge)

    def write(self, row: dict) -> None:
        self.rows.append(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()

    def plot(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        train = [(r["step"], r["loss"]) for r in self.rows if "loss" in r]
        evals = [(r["step"], r["eval_loss"]) for r in self.rows if "eval_loss" in r]
        fig, ax = plt.subplots(figsize=(6, 4))
        if train:
            ax.plot(*zip(*train, strict=True), label="train loss")
        if evals:
            ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (per target token)")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        tmp = path.with_name(f".{path.name}.tmp.png")
        fig.savefig(tmp, dpi=100)
        tmp.replace(path)
        plt.close(fig)
