"""The side-by-side chart of one benchmark run (matplotlib, from the ``bench`` extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

COLOURS = {
    "consumer_svc": "#1f77b4",
    "consumer_svc c100/p200": "#17becf",
    "pika-twisted": "#ff7f0e",
    "pika-twisted-noack": "#ffbb78",
    "pika-select": "#2ca02c",
    "aio-pika": "#d62728",
    "kombu": "#9467bd",
    "timer-ceiling": "#7f7f7f",
}

TITLES = {
    "noop": "(a) no-op, 100 B bodies: msg/s",
    "io": "(b) 10 ms non-blocking wait: % of 10,000 msg/s",
    "blocking": "(c) 10 ms blocking, 10 threads: % of 1,000 msg/s",
    "large": "(d) no-op, 64 KiB bodies: msg/s",
}
BOUNDS = {"io": 10_000.0, "blocking": 1_000.0}
#: p50 and p99 of each latency level, light and dark.
LATENCY_COLOURS = ["#9ecae1", "#3182bd", "#fdae6b", "#e6550d", "#a1d99b", "#31a354"]


def _bars(
    ax: Any, names: list[str], values: list[float], spreads: list[tuple[float, float]]
) -> None:
    low = [v - lo for v, (lo, _) in zip(values, spreads)]
    high = [hi - v for v, (_, hi) in zip(values, spreads)]
    bars = ax.barh(
        names,
        values,
        xerr=[low, high],
        color=[COLOURS.get(n, "#bcbd22") for n in names],
        capsize=2,
    )
    ax.invert_yaxis()
    ax.bar_label(
        bars,
        labels=[f"{v:,.0f}" if v >= 100 else f"{v:.1f}" for v in values],
        padding=3,
        fontsize=8,
    )
    ax.margins(x=0.25)
    ax.tick_params(labelsize=8)


def draw(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: list[str] = list(summary["throughput"])
    if summary.get("latency"):
        panels += ["latency"]
    if summary.get("scaling"):
        panels += ["scaling"]
    columns = 2
    rows = (len(panels) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(13, 3.6 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        if panel in summary["throughput"]:
            figures = summary["throughput"][panel]
            names = list(figures)
            scale = 100 / BOUNDS[panel] if panel in BOUNDS else 1.0
            _bars(
                ax,
                names,
                [figures[n]["median"] * scale for n in names],
                [(figures[n]["min"] * scale, figures[n]["max"] * scale) for n in names],
            )
            ax.set_title(TITLES.get(panel, panel), fontsize=10)
        elif panel == "latency":
            loads = summary["latency"]
            names = list(next(iter(loads.values())))
            width = 0.8 / (2 * len(loads))
            for i, (load, figures) in enumerate(loads.items()):
                for j, key in enumerate(("ack_p50_ms", "ack_p99_ms")):
                    offset = (2 * i + j) * width - 0.4 + width / 2
                    ax.bar(
                        [k + offset for k in range(len(names))],
                        [figures[n][key] for n in names],
                        width,
                        label=f"{load}, {key.split('_')[1]}",
                        color=LATENCY_COLOURS[(2 * i + j) % len(LATENCY_COLOURS)],
                    )
            ax.set_xticks(range(len(names)), names, fontsize=8)
            ax.set_yscale("log")
            ax.set_ylabel("ms, log scale", fontsize=8)
            ax.legend(fontsize=7)
            ax.set_title(
                "publish to ack: at 50 % / 90 % of each one's capacity, at one rate", fontsize=10
            )
        else:
            scaling = summary["scaling"]
            rates = scaling["rates"]
            names = [f"{n} instance{'s' if n != '1' else ''}" for n in rates]
            values = list(rates.values())
            _bars(ax, names, values, [(v, v) for v in values])
            ax.set_title(
                f"consumer_svc, {scaling['ms']:.1f} ms CPU-bound handler: msg/s "
                f"({values[-1] / values[0]:.2f}x with {list(rates)[-1]})",
                fontsize=10,
            )
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    title = f"consumer_svc benchmark, {summary['started']}\n{summary['machine']}"
    if "load" in summary:
        load = summary["load"]
        title += f"; during the run {load['min']:.2f}-{load['max']:.2f}"
    if "rabbitmq" in summary:
        title += f"; RabbitMQ {summary['rabbitmq']}"
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
