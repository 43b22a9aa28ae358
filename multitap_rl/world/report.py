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


def _chance(report: dict) -> dict[str, float]:
    """Chance per attribute on the held-out set: 1 / the number of values of this run's world (its
    config), else the default world's :data:`_CHANCE`."""
    cfg = report.get("config") or {}
    pools = {"color": cfg.get("colors"), "shape": cfg.get("shapes"), "position": cfg.get("positions")}
    return {a: 1 / len(pools[a]) if pools[a] else _CHANCE[a] for a in ATTRIBUTES}


def _panels(plt, n: int, width: float, height: float, bottom: float = 0.0):
    """A figure with ``n`` small panels, at most three a row; the unused ones hidden."""
    cols = min(3, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows + bottom), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, list(axes.flat[:n])


def _reward_curves(plt, runs: list[dict], out: Path) -> str:
    """``reward_curve.png``: one panel per run -- each weighting's reward is on its own scale (a
    weighted sum of other dimensions), so the runs are not drawn on one axis."""
    fig, axes = _panels(plt, len(runs), 4.0, 3.0)
    for ax, r in zip(axes, runs):
        ax.plot(range(1, len(r["rewards"]) + 1), r["rewards"], lw=1, color="C0")
        ax.set_xlabel("GRPO step")
        ax.set_ylabel("mean reward")
        ax.set_title(_name(r), fontsize=9)
    fig.suptitle("MULTI-TAP reward during GRPO (one panel per weighting: scales differ)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "reward_curve.png", dpi=100)
    plt.close(fig)
    return "reward_curve.png"


def _heldout_curves(plt, report: dict, runs: list[dict], out: Path) -> str:
    """``heldout_accuracy.png``: per run, held-out accuracy of each attribute with its chance level
    (dotted, same colour) and the fraction of well-formed captions; one legend below the panels."""
    from matplotlib.lines import Line2D

    chance = _chance(report)
    colours = {a: f"C{i}" for i, a in enumerate(ATTRIBUTES)}
    fig, axes = _panels(plt, len(runs), 4.5, 3.2, bottom=0.5)
    for ax, r in zip(axes, runs):
        steps = [c["step"] for c in r["curve"]]
        for a in ATTRIBUTES:
            ax.plot(steps, [c[a] for c in r["curve"]], marker="o", ms=3, color=colours[a], label=a)
            ax.axhline(chance[a], color=colours[a], ls=":", lw=1)
        if all("format" in c for c in r["curve"]):
            ax.plot(steps, [c["format"] for c in r["curve"]], color="black", ls="--", lw=1, label="format")
        ax.set(xlabel="GRPO step", ylabel="held-out accuracy", ylim=(0, 1.05))
        ax.set_title(_name(r), fontsize=9)
    handles = [Line2D([], [], color=colours[a], marker="o", ms=3, label=a) for a in ATTRIBUTES]
    handles.append(Line2D([], [], color="black", ls="--", lw=1, label="format (well-formed captions)"))
    handles.append(Line2D([], [], color="grey", ls=":", lw=1, label="chance ("
                          + ", ".join(f"{a} 1/{round(1 / chance[a])}" for a in ATTRIBUTES) + ")"))
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, frameon=False)
    height = fig.get_size_inches()[1]
    fig.tight_layout(rect=(0, 0.6 / height, 1, 1))  # room for the legend's rows below the panels
    fig.savefig(out / "heldout_accuracy.png", dpi=100)
    plt.close(fig)
    return "heldout_accuracy.png"


def write_plots(report: dict, sheet_images, out_dir: str | Path) -> list[str]:
    """``reward_curve.png``, ``heldout_accuracy.png`` and ``samples.png`` in ``out_dir`` (and
    ``tradeoff.png`` for a multi-objective report); their names."""
    plt = _pyplot()
    out = Path(out_dir)
    runs = _runs(report)
    _reward_curves(plt, runs, out)
    _heldout_curves(plt, report, runs, out)

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
