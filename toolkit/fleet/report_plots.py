"""The fleet report's plots (matplotlib, Agg): p95 per version from merged histograms, throughput, failed
requests, devices per version and drift per device, all over the telemetry rows they are given."""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np

from agent.fleet.telemetry import PSI_THRESHOLD, Histogram
from toolkit.units import log_axis

# Okabe & Ito's colour-blind safe palette (no red/green pairs), then line styles for more series
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")
STYLES = ("-", "--", "-.", ":")
OUTLIER_RATIO = 5.0  # a p95 above this many times the median p95 switches the latency axis to log


def _label(r: Any) -> str:
    return f"{r['model']}@{r['version']}" if r["model"] else "no model"


def _style(k: int) -> dict[str, Any]:
    return {"color": PALETTE[k % len(PALETTE)], "ls": STYLES[(k // len(PALETTE)) % len(STYLES)]}


def _empty(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=12, color="#444")
    ax.set_yticks([])


def plots(tele: list[Any]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    t0 = tele[0]["t"]
    t = np.array([r["t"] - t0 for r in tele])
    labels = [_label(r) for r in tele]
    versions = sorted(set(labels))
    # time bins no narrower than the devices' reporting interval, so each bin holds every device once
    per_device: dict[str, list[float]] = {}
    for r in tele:
        per_device.setdefault(r["device"], []).append(r["t"])
    gaps = [b - a for ts in per_device.values() for a, b in zip(ts, ts[1:])]
    width = max(float(np.median(gaps)) if gaps else 1.0, (t.max() or 1.0) / 60)
    edges = np.arange(0.0, t.max() + width, width)
    n = max(len(edges) - 1, 1)
    which = np.clip(np.digitize(t, edges) - 1, 0, n - 1)

    fig, axes = plt.subplots(5, 1, figsize=(10, 16), constrained_layout=True)
    ax = axes[0]
    drawn: list[float] = []
    for k, v in enumerate(versions):
        hists = [Histogram() for _ in range(n)]
        for i, r in enumerate(tele):
            if labels[i] == v and r["count"]:
                hists[which[i]].add_doc(json.loads(r["doc"]).get("inference", {}).get("hist"))
        xs = [edges[b] + width / 2 for b in range(n) if hists[b].count]
        ys = [hists[b].percentile(95) for b in range(n) if hists[b].count]
        drawn += ys
        if ys:  # a version that served nothing (e.g. "no model") gets no legend entry
            ax.plot(xs, ys, marker="o", ms=4, label=v, **_style(k))
    if not drawn:
        _empty(ax, "no requests in this window")
    elif max(drawn) > OUTLIER_RATIO * float(np.median(drawn)):
        log_axis(ax)  # a few slow bins (start-up, a hiccup) must not flatten the rest
    ax.set_title("p95 latency (ms) per time bin, by version (merged histograms"
                 + ("; log scale)" if ax.get_yscale() == "log" else ")"))
    if drawn:
        ax.legend(fontsize=8)

    req = np.bincount(which, weights=[r["count"] for r in tele], minlength=n)
    err = np.bincount(which, weights=[r["errors"] for r in tele], minlength=n)
    axes[1].bar(edges[:n], req / width, width=width, align="edge", color=PALETTE[0])
    axes[1].set_title("fleet throughput (requests/s)")
    axes[2].set_title("failed requests per time bin")
    if err.sum():
        axes[2].bar(edges[:n], err, width=width, align="edge", color=PALETTE[5])
        axes[2].yaxis.set_major_locator(MaxNLocator(integer=True))
    else:
        _empty(axes[2], "no failed requests in this window")

    running: dict[str, str] = {}  # each device's latest reported version, carried forward
    counts: dict[str, list[int]] = {v: [] for v in versions}
    order = np.argsort(t, kind="stable")
    k = 0
    for edge in edges[1:]:
        while k < len(order) and t[order[k]] < edge:
            running[tele[order[k]]["device"]] = labels[order[k]]
            k += 1
        for v in versions:
            counts[v].append(sum(1 for x in running.values() if x == v))
    ax = axes[3]
    for j, v in enumerate(versions):
        ax.step(edges[:len(counts[v])], counts[v], where="post", lw=2.5, label=v, **_style(j))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(-0.2, len(per_device) + 0.5)
    ax.set_title("devices per version (rollout progress)")
    ax.legend(fontsize=8)

    ax = axes[4]
    shown = 0
    for j, dev in enumerate(sorted(per_device)[:20]):
        sel = [i for i, r in enumerate(tele) if r["device"] == dev and r["max_psi"] is not None]
        if sel:  # markers: a device with a single drift score is still visible
            ax.plot(t[sel], [tele[i]["max_psi"] for i in sel], marker="o", ms=5, label=dev, **_style(j))
            shown += 1
    if shown:
        ax.axhline(PSI_THRESHOLD, color="#000", ls="--", lw=1, label=f"default threshold {PSI_THRESHOLD:g}")
        ax.legend(fontsize=7, ncol=4)
        ax.set_ylim(bottom=0)
    else:
        _empty(ax, "no drift scores in this window")
    ax.set_title("drift: max PSI per device and record")
    start = time.strftime("%H:%M:%S", time.localtime(t0))
    for ax in axes:
        ax.set_xlabel(f"seconds since {start}")
        ax.set_xlim(0, max(edges[-1], width))
        ax.grid(alpha=0.3)
    return fig
