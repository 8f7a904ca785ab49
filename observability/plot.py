"""Plot a run's metrics.jsonl (loss and validation loss, learning rate, tokens/s) to a PNG,
or several runs' overlaid.

python -m observability.plot --metrics model_checkpoints/run1/metrics.jsonl --out run1.png
python -m observability.plot --metrics a/metrics.jsonl b/metrics.jsonl --labels sync diloco --out both.png
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

log = logging.getLogger("observability.plot")


def plot_metrics(metrics: Path | list[Path], out: Path, labels: list[str] | None = None) -> Path:
    """One run's curves, or several runs' overlaid (each labelled by ``labels`` or its folder)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [metrics] if isinstance(metrics, Path) else list(metrics)
    labels = labels or [path.parent.name for path in runs]
    if len(labels) != len(runs):
        raise ValueError(f"{len(labels)} labels for {len(runs)} metrics files: give one per file")
    fig, (ax_loss, ax_lr, ax_speed) = plt.subplots(3, 1, figsize=(8, 8), sharex=True)
    for path, label in zip(runs, labels, strict=True):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        train = {r["step"]: r for r in rows if "loss" in r}  # a resumed run's rows replace older ones
        valid = {r["step"]: r for r in rows if "valid.loss" in r}
        if not train:
            raise ValueError(f"{path} has no training rows to plot")
        steps = sorted(train)
        ax_loss.plot(steps, [train[s]["loss"] for s in steps], label=f"{label} train" if len(runs) > 1 else "train")
        if valid:
            ax_loss.plot(sorted(valid), [valid[s]["valid.loss"] for s in sorted(valid)], "o-", label=f"{label} valid")
        ax_lr.plot(steps, [train[s]["lr"] for s in steps], label=label)
        ax_speed.plot(steps, [train[s]["tokens_per_s"] for s in steps], label=label)
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_lr.set_ylabel("learning rate")
    ax_speed.set_ylabel("tokens/s")
    ax_speed.set_xlabel("step")
    fig.suptitle(str(runs[0]) if len(runs) == 1 else ", ".join(labels))
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--metrics", required=True, type=Path, nargs="+", help="metrics.jsonl of one run or more")
    parser.add_argument("--labels", nargs="*", default=None, help="a name per run (default: its folder)")
    parser.add_argument("--out", required=True, type=Path, help="PNG to write")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log.info("wrote %s", plot_metrics(args.metrics, args.out, args.labels))


if __name__ == "__main__":
    main()
