"""The HTML build report: per-profile variant table and plots of size, latency and accuracy."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.store import atomic_write
from toolkit.build.gate import p95_text
from toolkit.units import fmt_ms, log_axis

if TYPE_CHECKING:
    from toolkit.build.pipeline import BuildResult


# Okabe & Ito's colour-blind safe palette, plus a hatch, so "chosen" and "failed" never rely on colour alone
KINDS = {"chosen": ("#0072B2", "//"), "passed": ("#009E73", ""), "failed": ("#D55E00", "xx")}


def _kind(v: Any) -> str:
    return "chosen" if v.chosen else "passed" if v.passed else "failed"


def _drop(v: Any) -> float | None:
    """Points lost against the fp32 reference: accuracy with labels, top-1 agreement without."""
    m = v.metrics
    if "accuracy_drop_points" in m:
        return m["accuracy_drop_points"]
    if "top1_agreement" in m:
        return 100.0 * (1.0 - m["top1_agreement"])
    return None


def _plots(result: "BuildResult") -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    rows = [v for p in result.profiles for v in p.variants if v.size_bytes]
    if not rows:
        return ""
    labels = [f"{v.profile}\n{v.runtime} {v.precision}" for v in rows]
    kinds = [_kind(v) for v in rows]
    p50 = [v.latency.get("p50_ms") for v in rows]
    in_us = all(x is None or x < 1 for x in p50)
    drops = [_drop(v) for v in rows]
    series = [("size (MB)", [v.size_bytes / 1e6 for v in rows]),
              (f"host p50 latency ({'µs' if in_us else 'ms'})",
               [None if x is None else x * (1000 if in_us else 1) for x in p50]),
              ("accuracy drop vs the fp32 reference (points)\n(without labels: top-1 disagreement with fp32)",
               drops)]
    fig, axes = plt.subplots(len(series), 1, figsize=(max(8, 0.7 * len(rows)), 11), constrained_layout=True)
    for ax, (title, values) in zip(axes, series):
        for i, (val, kind) in enumerate(zip(values, kinds)):
            if val is None:
                ax.text(i, 0, "n/a", ha="center", va="bottom", fontsize=7, color="#555")
                continue
            color, hatch = KINDS[kind]
            ax.bar(i, val, color=color, hatch=hatch, edgecolor="white" if hatch else color)
        ax.set_title(title, fontsize=10)
        ax.set_xticks(range(len(rows)), labels, rotation=60, fontsize=7, ha="right")
        ax.set_xlim(-0.6, len(rows) - 0.4)
        ax.grid(axis="y", alpha=0.3)
        shown = [x for x in values if x]
        if ax is axes[1] and shown and max(shown) > 20 * min(shown):
            log_axis(ax)  # µs next to tens of ms: a linear axis would show only the slow ones
            ax.set_title(title + " (log scale)", fontsize=10)
    ax = axes[2]
    for i, val in enumerate(drops):
        if val is not None:
            ax.annotate(f"{val:.2f}", (i, val), ha="center", va="bottom" if val >= 0 else "top", fontsize=7)
    ax.axhline(0, color="#000", lw=0.8)
    limits = {p.profile.max_accuracy_drop for p in result.profiles}
    if len(limits) == 1:
        ax.axhline(limits.pop(), color="#000", ls="--", lw=1)
        ax.set_title(ax.get_title() + "; dashed: the profile's limit")
    fig.suptitle(f"{result.name} {result.label}: variants per profile")
    fig.legend(handles=[Patch(facecolor=c, hatch=h, edgecolor="white", label=k) for k, (c, h) in KINDS.items()],
               loc="outside lower center", ncols=3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return f'<img alt="variant plots" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def write_report(result: "BuildResult", path: Path) -> None:
    e = html.escape
    parts = [f"<!doctype html><meta charset='utf-8'><title>edgeship build {e(result.name)} "
             f"{result.label}</title><style>body{{font-family:sans-serif;margin:2em}}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px}"
             ".fail{color:#b00}.chosen{background:#e0f4f1}</style>",
             f"<h1>{e(result.name)} {result.label}</h1>"]
    parts += [f"<p>note: {e(n)}</p>" for n in result.notes]
    for p in result.profiles:
        prof = p.profile
        runtimes = ", ".join(f"{r.name} {r.version}" for r in prof.runtimes)
        parts.append(f"<h2>{e(prof.name)}</h2><p>{e(prof.description)} — {e(runtimes)}, "
                     f"{prof.threads} threads, objective {e(prof.objective)}; "
                     f"budgets: {prof.max_model_mb:g} MB, {prof.max_ram_mb:g} MB RAM, "
                     f"p95 {prof.max_p95_ms:g} ms (host x{prof.device_slowdown:g})</p>")
        if p.refused:
            parts.append(f"<p class='fail'>refused: {e(p.refused)}</p>")
            continue
        parts.append("<table><tr><th>runtime</th><th>variant</th><th>size MB</th><th>accuracy</th>"
                     "<th>drop pts</th><th>top-1 agree</th><th>SNR dB</th><th>int equal</th><th>init ms</th>"
                     "<th>p50</th><th>p95 ms (runs)</th><th>p99</th><th>peak RSS MB</th><th>result</th></tr>")
        for v in p.variants:
            m, lat = v.metrics, v.latency
            f = lambda d, k, fmt: format(d[k], fmt) if k in d else "-"  # noqa: E731
            verdict = "chosen" if v.chosen else "pass" if v.passed else "; ".join(v.reasons)
            if m.get("reference") == "self":
                verdict += " — the reference is this .tflite file itself: fidelity 1 by construction"
            cls = "chosen" if v.chosen else "" if v.passed else "fail"
            parts.append(
                f"<tr class='{cls}'><td>{e(v.runtime)}</td><td>{e(v.precision)}</td>"
                f"<td>{v.size_bytes / 1e6:.3f}</td>"
                f"<td>{f(m, 'accuracy', '.4f')}</td><td>{f(m, 'accuracy_drop_points', '.2f')}</td>"
                f"<td>{f(m, 'top1_agreement', '.4f')}</td><td>{f(m, 'snr_db', '.1f')}</td>"
                f"<td>{f(m, 'int_agreement', '.4f')}</td>"
                f"<td>{f(lat, 'init_ms', '.1f')}</td><td>{fmt_ms(lat.get('p50_ms'))}</td>"
                f"<td>{e(p95_text(lat))}</td>"
                f"<td>{fmt_ms(lat.get('p99_ms'))}</td><td>{f(lat, 'peak_rss_mb', '.0f')}</td>"
                f"<td>{e(verdict)}</td></tr>")
        parts.append("</table>")
        notes = p.notes + [f"{v.precision}: {n}" for v in p.variants for n in v.notes]
        parts += [f"<p>note: {e(n)}</p>" for n in notes]
        if p.bundle:
            parts.append(f"<p>bundle: <code>{e(str(p.bundle))}</code> sha256 <code>{p.bundle_sha256}</code></p>")
    parts.append(_plots(result))
    atomic_write(path, "\n".join(parts).encode("utf-8"), public=True)
