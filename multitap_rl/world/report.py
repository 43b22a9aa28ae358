"""The captioner world's report: plots (matplotlib, written to files) and the final table."""

from __future__ import annotations

from pathlib import Path

from ..errors import require
from .shapes_world import ATTRIBUTES


def _pyplot():
    matplotlib = require("matplotlib", "plots", "the demo's plots")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in text)


def _runs(report: dict) -> list[dict]:
    """Every trained run once: the default, then the steering and the multi-objective ones."""
    runs = [report["captioner"]]
    runs += [r for r in report.get("steering", []) if r["weights"] != runs[0]["weights"]]
    return runs + list(report.get("combined", []))


def _name(run: dict) -> str:
    agg = run.get("aggregation", "sum")
    return run["weights"] if agg == "sum" else f"{run['weights']} ({agg})"


# chance on the held-out set: one value of each attribute drawn uniformly
_CHANCE = {"color": 1 / 4, "shape": 1 / 4, "position": 1 / 3}


def _tradeoff(plt, report: dict, out: Path) -> str:
    """``tradeoff.png``: colour vs position accuracy after training, one point per run."""
    fig, ax = plt.subplots(figsize=(5, 4.5))
    for r in report["multi_objective"]:
        h = r["heldout"]
        marker = "o" if r["aggregation"] == "sum" else "s"
        ax.scatter(h["color"]["after"], h["position"]["after"], marker=marker, s=50,
                   label=_name(r))
    ax.axvline(_CHANCE["color"], color="grey", ls=":", lw=1)
    ax.axhline(_CHANCE["position"], color="grey", ls=":", lw=1, label="chance")
    ax.set(xlabel="held-out colour accuracy (after)", ylabel="held-out position accuracy (after)",
           xlim=(0, 1.05), ylim=(0, 1.05), title="weightings x aggregations")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(out / "tradeoff.png", dpi=100)
    plt.close(fig)
    return "tradeoff.png"


def write_plots(report: dict, sheet_images, out_dir: str | Path) -> list[str]:
    """``reward_curve.png``, ``heldout_accuracy.png`` and ``samples.png`` in ``out_dir``; their names."""
    plt = _pyplot()
    out = Path(out_dir)
    runs = _runs(report)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for r in runs:
        ax.plot(range(1, len(r["rewards"]) + 1), r["rewards"], label=_name(r), lw=1)
    ax.set(xlabel="GRPO step", ylabel="mean reward", title="weighted MULTI-TAP reward during GRPO")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "reward_curve.png", dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.5), squeeze=False)
    for ax, r in zip(axes[0], runs):
        steps = [c["step"] for c in r["curve"]]
        for a in ATTRIBUTES:
            ax.plot(steps, [c[a] for c in r["curve"]], marker="o", label=a)
        ax.set(xlabel="GRPO step", ylabel="held-out accuracy", ylim=(0, 1.05), title=_name(r))
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "heldout_accuracy.png", dpi=100)
    plt.close(fig)

    cap = report["captioner"]
    n = len(sheet_images)
    cols = min(4, max(1, n))
    rows = max(1, -(-n // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, s in zip(axes.flat, sheet_images, cap["samples"]):
        ax.imshow(img.resize((112, 112), 0))
        title = f"truth:  {s['truth']}\nbefore: {_printable(s['before'])}\nafter:  {_printable(s['after'])}"
        ax.set_title(title, fontsize=7,
                     loc="left", family="monospace")
    fig.suptitle(f"held-out images, greedy captions before / after GRPO ({cap['weights']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "samples.png", dpi=100)
    plt.close(fig)
    names = ["reward_curve.png", "heldout_accuracy.png", "samples.png"]
    if report.get("multi_objective"):
        names.append(_tradeoff(plt, report, out))
    return names


def final_table(report: dict) -> list[str]:
    """Lines of the final table: held-out accuracy before / after per run and attribute."""
    width = max(24, *(len(_name(r)) for r in _runs(report)))
    lines = [f"{'weights':<{width}} {'attribute':<10} {'before':>7} {'after':>7} {'gain':>7}"]
    for r in _runs(report):
        for a in (*ATTRIBUTES, "format"):
            h = r["heldout"][a]
            mark = "  <- target" if a == r.get("target") else ""
            lines.append(f"{_name(r):<{width}} {a:<10} {h['before']:>7.3f} {h['after']:>7.3f} "
                         f"{h['after'] - h['before']:>+7.3f}{mark}")
        lines.append(f"{_name(r):<{width}} {'reward':<10} {r['reward']['first']:>7.3f} {r['reward']['last']:>7.3f} "
                     f"{r['reward']['last'] - r['reward']['first']:>+7.3f}")
    return lines
