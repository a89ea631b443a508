"""Fleet status, live view and HTML report from the collector's SQLite database.

One window and one rule everywhere: every number of a device (requests, error rate, p95 from the merged
latency histograms, drift) comes from its telemetry of the last ``window`` seconds, and a device is
drifting when a record of that window was flagged; the report's table and plots cover the same window.
"""

from __future__ import annotations

import base64
import html
import io
import sqlite3
import time
from pathlib import Path
from typing import Any

from agent.store import atomic_write
from toolkit.fleet.collector import open_db
from toolkit.fleet.stats import labels, query
from toolkit.units import fmt_ms

HEARTBEAT_MISSES = 3  # a device is offline after this many missed heartbeats


def status(db: sqlite3.Connection, window: float = 300, now: float | None = None) -> list[dict[str, Any]]:
    """One row per device: group, online, model version, and over the last ``window`` seconds its requests,
    error rate, p95, drift flag and highest drift score; last seen."""
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
        s = query(db, "device = ? AND t >= ?", [name, now - window])
        hb = d.get("heartbeat_s")  # None: no heartbeat, presence comes from connect + last will only
        seen = d.get("last_seen") or 0
        online = bool(d.get("online")) and (not hb or now - seen <= HEARTBEAT_MISSES * hb)
        out.append({"device": name, "group": d.get("grp") or (last["grp"] if last else ""), "online": online,
                    "model": d.get("model") or (last["model"] if last else None),
                    "version": d.get("version") if d.get("version") is not None else (last["version"] if last else None),
                    "status": d.get("status"), "requests": s.requests, "error_rate": s.error_rate,
                    "p50_ms": s.p(50), "p95_ms": s.p(95), "drift": s.drift_flag, "max_psi": s.max_psi,
                    "dropped": s.dropped, "cpu_temp_c": last["cpu_temp_c"] if last else None,
                    "last_seen": seen or None, "window_s": window})
    return out


def versions(db: sqlite3.Connection, window: float = 300, now: float | None = None) -> list[dict[str, Any]]:
    """One row per model version seen in the last ``window`` seconds: devices, requests, live accuracy from
    the field labels received in the window (samples labelled, accuracy), the confidence histogram (top-1
    probability in tenths) and predicted-class distribution of its classifier output, captured records."""
    now = now or time.time()
    since = now - window
    keys = {(r[0], r[1]) for r in db.execute("SELECT DISTINCT model, version FROM telemetry WHERE t >= ? AND "
                                             "model IS NOT NULL AND version IS NOT NULL", (since,))}
    keys |= {(r[0], r[1]) for r in db.execute("SELECT DISTINCT model, version FROM labels WHERE received >= ?",
                                              (since,))}
    out = []
    for model, version in sorted(keys):
        s = query(db, "model = ? AND version = ? AND t >= ?", [model, version, since])
        lab = labels(db, "model = ? AND version = ? AND received >= ?", [model, version, since])
        devices = db.execute("SELECT COUNT(DISTINCT device) FROM telemetry WHERE model = ? AND version = ? AND t >= ?",
                             (model, version, since)).fetchone()[0]
        captured = db.execute("SELECT COUNT(*) FROM captures WHERE model = ? AND version = ? AND received >= ?",
                              (model, version, since)).fetchone()[0]
        output = next(iter(s.classes), None)
        out.append({"model": model, "version": version, "devices": devices, "requests": s.requests,
                    "labelled": lab.samples, "accuracy": lab.accuracy, "captured": captured, "output": output,
                    "confidence": [int(x) for x in s.confidence.get(output, [])] if output else [],
                    "classes": [int(x) for x in s.classes[output]] if output else [], "window_s": window})
    return out


def version_table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'model':<16} {'devices':>7} {'requests':>8} {'labelled':>8} {'live acc':>8} {'captured':>8}  "
            "confidence (top-1, tenths)   predicted classes")
    lines = [head, "-" * len(head)]
    for r in rows:
        acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
        lines.append(f"{r['model'] + '@' + str(r['version']):<16} {r['devices']:>7} {r['requests']:>8} "
                     f"{r['labelled']:>8} {acc:>8} {r['captured']:>8}  {_bars(r['confidence']):<28} "
                     f"{_bars(r['classes'])}")
    return "\n".join(lines)


def _bars(counts: list[int]) -> str:
    """A histogram as one line of block characters (empty: -)."""
    if not counts or not sum(counts):
        return "-"
    top = max(counts)
    return "".join(" ▁▂▃▄▅▆▇█"[round(8 * c / top)] for c in counts)


def _drift(r: dict[str, Any]) -> str:
    return "-" if r["max_psi"] is None else f"{'YES' if r['drift'] else 'no'} {r['max_psi']:.2f}"


def table(rows: list[dict[str, Any]], now: float | None = None, window: float = 300) -> str:
    now = now or time.time()
    head = (f"{'device':<18} {'group':<10} {'online':<7} {'model':<14} {'requests':>8} {'p95':>9} {'err %':>6} "
            f"{'drift psi':<10} last seen")
    lines = [f"last {window:g} s", head, "-" * len(head)]
    for r in rows:
        model = f"{r['model'] or '-'}@{r['version']}" if r["version"] is not None else "-"
        err = f"{100 * r['error_rate']:.1f}" if r["error_rate"] is not None else "-"
        seen = f"{now - r['last_seen']:.0f}s ago" if r["last_seen"] else "never"
        lines.append(f"{r['device']:<18} {r['group'] or '-':<10} {'yes' if r['online'] else 'NO':<7} {model:<14} "
                     f"{r['requests']:>8} {fmt_ms(r['p95_ms']):>9} {err:>6} {_drift(r):<10} {seen}")
    on = sum(r["online"] for r in rows)
    lines.append(f"{len(rows)} devices, {on} online, {sum(r['drift'] for r in rows)} drifting")
    return "\n".join(lines)


def write_report(db_path: Path, out: Path, window: float = 3600, now: float | None = None) -> Path:
    """HTML with the status table and plots over the same window: p95 per version over time, throughput,
    failed requests, devices per version (rollout progress) and drift."""
    from toolkit.fleet.report_plots import plots

    now = now or time.time()
    db = open_db(db_path, must_exist=True)
    try:
        rows = status(db, window, now)
        vrows = versions(db, window, now)
        tele = db.execute("SELECT device, t, model, version, count, errors, doc, max_psi, drift_flag "
                          "FROM telemetry WHERE t >= ? ORDER BY t", (now - window,)).fetchall()
    finally:
        db.close()
    e = html.escape
    span = (f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(now - window))} to "
            f"{time.strftime('%H:%M:%S', time.localtime(now))}")
    parts = ["<!doctype html><meta charset='utf-8'><title>edgeship fleet report</title><style>"
             "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px}.bad{color:#b00;font-weight:bold}"
             "td.n{text-align:right}</style>",
             f"<h1>Fleet report</h1><p>The last {window:g} s ({span}): {len(rows)} devices, "
             f"{sum(r['online'] for r in rows)} online, {sum(r['drift'] for r in rows)} drifting; "
             f"{len(tele)} telemetry records. Table and plots cover the same window; p95 comes from the merged "
             "latency histograms.</p>",
             "<table><tr><th>device</th><th>group</th><th>online</th><th>model</th><th>requests</th><th>p95</th>"
             "<th>error rate</th><th>drift (max PSI)</th><th>dropped</th></tr>"]
    for r in rows:
        model = f"{r['model'] or '-'}@{r['version']}" if r["version"] is not None else "-"
        parts.append(f"<tr><td>{e(r['device'])}</td><td>{e(r['group'] or '')}</td>"
                     f"<td class={'' if r['online'] else 'bad'}>{'yes' if r['online'] else 'no'}</td>"
                     f"<td>{e(model)}</td><td class=n>{r['requests']}</td><td class=n>{e(fmt_ms(r['p95_ms']))}</td>"
                     f"<td class=n>{'-' if r['error_rate'] is None else format(r['error_rate'], '.2%')}</td>"
                     f"<td class={'bad' if r['drift'] else 'n'}>{e(_drift(r))}</td><td class=n>{r['dropped']}</td>"
                     "</tr>")
    parts.append("</table>")
    parts.append(_version_html(vrows))
    if tele:
        parts.append(_img(plots(tele)))
    else:
        parts.append("<p>No telemetry in this window.</p>")
    atomic_write(out, "\n".join(parts).encode(), public=True)
    return out


def _version_html(rows: list[dict[str, Any]]) -> str:
    """Per version: live accuracy from field labels, confidence histogram, predicted-class distribution."""
    e = html.escape
    out = ["<h2>Per version</h2><p>Live accuracy comes from field labels (POST .../feedback on the devices) "
           "received in the window; confidence is the top-1 probability of the classifier output in tenths "
           "(0-0.1 ... 0.9-1); predicted classes as counted on the devices.</p>",
           "<table><tr><th>model</th><th>devices</th><th>requests</th><th>labelled samples</th><th>live accuracy</th>"
           "<th>captured</th><th>confidence histogram</th><th>predicted classes</th></tr>"]
    for r in rows:
        acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.2%}"
        out.append(f"<tr><td>{e(r['model'])}@{r['version']}</td><td class=n>{r['devices']}</td>"
                   f"<td class=n>{r['requests']}</td><td class=n>{r['labelled']}</td><td class=n>{acc}</td>"
                   f"<td class=n>{r['captured']}</td><td title='{e(str(r['confidence']))}'>{e(_bars(r['confidence']))}"
                   f"</td><td title='{e(str(r['classes']))}'>{e(_bars(r['classes']))}</td></tr>")
    out.append("</table>")
    return "\n".join(out)


def _img(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return f'<img alt="fleet plots" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'
