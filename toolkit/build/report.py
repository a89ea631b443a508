"""The HTML build report: per-profile variant table and plots of size, latency and accuracy."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import TYPE_CHECKING

from agent.store import atomic_write
from toolkit.build.gate import p95_text

if TYPE_CHECKING:
    from toolkit.build.pipeline import BuildResult


def _plots(result: "BuildResult") -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [v for p in result.profiles for v in p.variants if v.size_bytes]
    if not rows:
        return ""
    labels = [f"{v.profile}\n{v.runtime} {v.precision}" for v in rows]
    colors = ["#2a9d8f" if v.chosen else "#8ab17d" if v.passed else "#e76f51" for v in rows]
    series = [("size (MB)", [v.size_bytes / 1e6 for v in rows]),
              ("host p50 latency (ms)", [v.latency.get("p50_ms", 0.0) for v in rows]),
              ("accuracy / top-1 agreement",
               [v.metrics.get("accuracy", v.metrics.get("top1_agreement", 0.0)) for v in rows])]
    fig, axes = plt.subplots(len(series), 1, figsize=(max(8, 0.7 * len(rows)), 10), constrained_layout=True)
    for ax, (title, values) in zip(axes, series):
        ax.bar(range(len(rows)), values, color=colors)
        ax.set_title(title)
        ax.set_xticks(range(len(rows)), labels, rotation=60, fontsize=7, ha="right")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{result.name} {result.label}: chosen (teal), passed (green), failed (red)")
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
                     "<th>p50 ms</th><th>p95 ms (runs)</th><th>p99 ms</th><th>peak RSS MB</th><th>result</th></tr>")
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
                f"<td>{f(lat, 'init_ms', '.1f')}</td><td>{f(lat, 'p50_ms', '.3f')}</td>"
                f"<td>{e(p95_text(lat))}</td>"
                f"<td>{f(lat, 'p99_ms', '.3f')}</td><td>{f(lat, 'peak_rss_mb', '.0f')}</td>"
                f"<td>{e(verdict)}</td></tr>")
        parts.append("</table>")
        notes = p.notes + [f"{v.precision}: {n}" for v in p.variants for n in v.notes]
        parts += [f"<p>note: {e(n)}</p>" for n in notes]
        if p.bundle:
            parts.append(f"<p>bundle: <code>{e(str(p.bundle))}</code> sha256 <code>{p.bundle_sha256}</code></p>")
    parts.append(_plots(result))
    atomic_write(path, "\n".join(parts).encode("utf-8"))
