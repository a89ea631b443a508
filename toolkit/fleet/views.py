"""Fleet status, live view and HTML report from the collector's SQLite database."""

from __future__ import annotations

import base64
import html
import io
import sqlite3
import time
from pathlib import Path
from typing import Any

from agent.store import atomic_write
from toolkit.fleet.collector import aggregate, open_db

HEARTBEAT_MISSES = 3  # a device is offline after this many missed heartbeats


def status(db: sqlite3.Connection, window: float = 300, now: float | None = None) -> list[dict[str, Any]]:
    """One row per device: group, online, model version, p95 and error rate over the last ``window``
    seconds, drift flag, last seen."""
    now = now or time.time()
    rows = {r["device"]: dict(r) for r in db.execute("SELECT * FROM devices")}
    for r in db.execute("SELECT device, MAX(t) AS t, grp FROM telemetry GROUP BY device"):
        d = rows.setdefault(r["device"], {"device": r["device"], "grp": r["grp"], "online": None,
                                          "heartbeat_s": None, "model": None, "version": None, "status": None})
        d["last_seen"] = max(d.get("last_seen") or 0, r["t"] or 0)
    out = []
    for name in sorted(rows):
        d = rows[name]
        last = db.execute("SELECT * FROM telemetry WHERE device = ? ORDER BY seq DESC LIMIT 1", (name,)).fetchone()
        n, errs, p95, dropped = aggregate(db, "device = ? AND t >= ?", [name, now - window])
        hb = d.get("heartbeat_s")  # None: no heartbeat, presence comes from connect + last will only
        seen = d.get("last_seen") or 0
        online = bool(d.get("online")) and (not hb or now - seen <= HEARTBEAT_MISSES * hb)
        out.append({"device": name, "group": d.get("grp") or (last["grp"] if last else ""), "online": online,
                    "model": d.get("model") or (last["model"] if last else None),
                    "version": d.get("version") if d.get("version") is not None else (last["version"] if last else None),
                    "status": d.get("status"), "requests": n, "error_rate": errs / n if n else None,
                    "p95_ms": p95, "drift": bool(last["drift_flag"]) if last else False,
                    "max_psi": last["max_psi"] if last else None, "dropped": dropped,
                    "cpu_temp_c": last["cpu_temp_c"] if last else None, "last_seen": seen or None})
    return out


def table(rows: list[dict[str, Any]], now: float | None = None) -> str:
    now = now or time.time()
    head = f"{'device':<18} {'group':<10} {'online':<7} {'model':<14} {'p95 ms':>8} {'err %':>6} {'drift':<6} last seen"
    lines = [head, "-" * len(head)]
    for r in rows:
        model = f"{r['model'] or '-'}@{r['version']}" if r["version"] is not None else "-"
        p95 = f"{r['p95_ms']:.2f}" if r["p95_ms"] is not None else "-"
        err = f"{100 * r['error_rate']:.1f}" if r["error_rate"] is not None else "-"
        seen = f"{now - r['last_seen']:.0f}s ago" if r["last_seen"] else "never"
        drift = ("YES" if r["drift"] else "no") if r["max_psi"] is not None else "-"
        lines.append(f"{r['device']:<18} {r['group'] or '-':<10} {'yes' if r['online'] else 'NO':<7} {model:<14} "
                     f"{p95:>8} {err:>6} {drift:<6} {seen}")
    on = sum(r["online"] for r in rows)
    lines.append(f"{len(rows)} devices, {on} online, {sum(r['drift'] for r in rows)} drifting")
    return "\n".join(lines)


def _img(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def write_report(db_path: Path, out: Path, window: float = 300) -> Path:
    """HTML with plots: p95 per version over time, throughput, errors, devices per version (rollout
    progress) and drift."""
    import matplotlib

    matplotlib.use("Agg")
    db = open_db(db_path)
    try:
        rows = status(db, window)
        tele = db.execute("SELECT device, t, model, version, count, errors, p95_ms, max_psi FROM telemetry "
                          "ORDER BY t").fetchall()
    finally:
        db.close()
    e = html.escape
    parts = ["<!doctype html><meta charset='utf-8'><title>edgeship fleet report</title><style>"
             "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px}.bad{color:#b00}</style>",
             f"<h1>Fleet report</h1><p>{len(rows)} devices, {sum(r['online'] for r in rows)} online; "
             f"{len(tele)} telemetry records; generated {time.strftime('%Y-%m-%d %H:%M:%S')}</p>",
             "<table><tr><th>device</th><th>group</th><th>online</th><th>model</th><th>p95 ms</th>"
             "<th>error rate</th><th>drift (max PSI)</th><th>dropped</th></tr>"]
    for r in rows:
        parts.append(f"<tr><td>{e(r['device'])}</td><td>{e(r['group'] or '')}</td>"
                     f"<td class={'' if r['online'] else 'bad'}>{'yes' if r['online'] else 'no'}</td>"
                     f"<td>{e(str(r['model']))}@{r['version']}</td><td>{_f(r['p95_ms'])}</td>"
                     f"<td>{_f(r['error_rate'], '.2%')}</td><td class={'bad' if r['drift'] else ''}>"
                     f"{_f(r['max_psi'], '.3f')}</td><td>{r['dropped']}</td></tr>")
    parts.append("</table>")
    if tele:
        parts.append(_img(_plots(tele)))
    atomic_write(out, "\n".join(parts).encode())
    return out


def _label(r: Any) -> str:
    return f"{r['model']}@{r['version']}" if r["model"] else "no model"


def _plots(tele: list[Any]) -> Any:
    import matplotlib.pyplot as plt
    import numpy as np

    t0 = tele[0]["t"]
    t = np.array([r["t"] - t0 for r in tele])
    labels = [_label(r) for r in tele]
    versions = sorted(set(labels))
    fig, axes = plt.subplots(5, 1, figsize=(10, 16), constrained_layout=True)
    for v in versions:
        sel = [i for i, lab in enumerate(labels) if lab == v and tele[i]["p95_ms"]]
        axes[0].plot(t[sel], [tele[i]["p95_ms"] for i in sel], ".", label=v)
    axes[0].set_title("p95 latency (ms) per record, by version")
    axes[0].legend(fontsize=8)
    # time bins no narrower than the devices' reporting interval, so each bin holds every device once
    per_device: dict[str, list[float]] = {}
    for r in tele:
        per_device.setdefault(r["device"], []).append(r["t"])
    gaps = [b - a for ts in per_device.values() for a, b in zip(sorted(ts), sorted(ts)[1:])]
    width = max(float(np.median(gaps)) if gaps else 1.0, (t.max() or 1.0) / 60)
    edges = np.arange(0.0, t.max() + width, width)
    which = np.clip(np.digitize(t, edges) - 1, 0, max(len(edges) - 2, 0))
    n = max(len(edges) - 1, 1)
    req = np.bincount(which, weights=[r["count"] for r in tele], minlength=n)
    err = np.bincount(which, weights=[r["errors"] for r in tele], minlength=n)
    axes[1].bar(edges[:n], req / width, width=width, align="edge", color="#2a9d8f")
    axes[1].set_title("fleet throughput (requests/s)")
    axes[2].bar(edges[:n], err, width=width, align="edge", color="#e76f51")
    axes[2].set_title("failed requests per time bin")
    running: dict[str, str] = {}  # each device's latest reported version, carried forward
    counts = {v: [] for v in versions}
    order = np.argsort(t, kind="stable")
    k = 0
    for edge in edges[1:]:
        while k < len(order) and t[order[k]] < edge:
            running[tele[order[k]]["device"]] = labels[order[k]]
            k += 1
        for v in versions:
            counts[v].append(sum(1 for x in running.values() if x == v))
    for v in versions:
        axes[3].step(edges[1:len(counts[v]) + 1], counts[v], where="post", label=v)
    axes[3].set_title("devices per version (rollout progress)")
    axes[3].legend(fontsize=8)
    for dev in sorted({r["device"] for r in tele})[:20]:
        sel = [i for i, r in enumerate(tele) if r["device"] == dev and r["max_psi"] is not None]
        axes[4].plot(t[sel], [tele[i]["max_psi"] for i in sel], label=dev)
    axes[4].axhline(0.25, color="#b00", ls="--", lw=1)
    axes[4].set_title("drift: max PSI per device (dashed: default threshold)")
    axes[4].legend(fontsize=7, ncol=4)
    for ax in axes:
        ax.set_xlabel("seconds since first record")
        ax.grid(alpha=0.3)
    return fig


def _f(x: Any, fmt: str = ".2f") -> str:
    return "-" if x is None else format(x, fmt)
