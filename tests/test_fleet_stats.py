"""Fleet numbers people act on, on records made by the device's own code (Window, telemetry_doc) and stored
by the collector's parser: true percentiles from merged histograms, the right control for a canary,
accuracy verdicts, one drift rule for status, table and report."""

from __future__ import annotations


import numpy as np
import pytest

from agent.fleet.protocol import device_topic, telemetry_doc, telemetry_payload
from agent.fleet.telemetry import Window
from toolkit.fleet.collector import SQL, open_db, parse
from toolkit.fleet.rollout import Thresholds, health_verdict
from toolkit.fleet.views import status, table

NOW = 1_800_000_000.0
REF = [0.25, 0.25, 0.25, 0.25]  # the bundle's reference fractions of one input's 4 bins


class Fleet:
    """Telemetry records as devices send them, stored by the collector's parser."""

    def __init__(self, path):
        self.db = open_db(path)
        self.seq: dict[str, int] = {}

    def record(self, device, t, latencies_ms=(), errors=0, model="digits", version=1, group="a", classes=None,
               inputs=None, drift=None):
        w = Window()
        for i, ms in enumerate(latencies_ms):
            w.observe(ms, i >= errors)
        d = None
        if classes is not None or inputs is not None or drift is not None:
            d = {"rows": len(latencies_ms), "max_psi": drift or 0.0, "flag": (drift or 0) > 0.25, "threshold": 0.25,
                 "inputs": [{"name": "image", "psi": 0.0, "counts": [int(x) for x in inputs], "ref_p": REF}]
                 if inputs is not None else [],
                 "outputs": [{"name": "probs", "psi": 0.0, "counts": [int(x) for x in classes]}]
                 if classes is not None else []}
        doc = telemetry_doc(device, group, 10.0, model, version, w.snapshot(), d, {}, {"status": "", "error": ""})
        doc["t"] = t
        self.seq[device] = self.seq.get(device, 0) + 1
        kind, row = parse("f", device_topic("f", device, "telemetry"), telemetry_payload(doc, self.seq[device], 0),
                          now=NOW)
        self.db.execute(SQL[kind], row)
        self.db.commit()


@pytest.fixture
def fleet(tmp_path):
    f = Fleet(tmp_path / "fleet.db")
    yield f
    f.db.close()


def test_p95_is_a_percentile_of_all_requests_not_a_mean_of_p95s(fleet):
    """900 fast requests in one record and 100 slow ones in the next: the 95th percentile request is a slow
    one (50 ms); a request-weighted mean of the two records' p95 would say 5.9 ms."""
    fleet.record("pi-1", NOW - 20, [1.0] * 900)
    fleet.record("pi-1", NOW - 10, [50.0] * 100)
    rows = fleet.db.execute("SELECT p95_ms, count FROM telemetry").fetchall()
    mean_of_p95 = sum(r["p95_ms"] * r["count"] for r in rows) / sum(r["count"] for r in rows)
    assert mean_of_p95 < 7
    (row,) = status(fleet.db, window=300, now=NOW)
    assert row["p95_ms"] == pytest.approx(50, rel=0.08) and row["requests"] == 1000
    assert row["p50_ms"] == pytest.approx(1, rel=0.08)
    # and a canary verdict reads the same true p95: 50 ms vs a control at 30 ms is 67% slower
    for i in range(3):
        fleet.record("pi-2", NOW - 15 + i, [30.0] * 300, version=1)
    fleet.db.execute("UPDATE telemetry SET version = 2 WHERE device = 'pi-1'")
    reason, summary = health_verdict(fleet.db, ["pi-1"], "digits", "a", 2, [1], NOW - 60, NOW, NOW - 60)
    assert reason.startswith("p95 5"), summary


def test_control_is_the_same_model_in_the_same_group(fleet):
    """The canary (digits v2 in group a) is compared with digits v1 in group a only: devices outside the wave
    in the same window and the canary's own pre-rollout records. Another model in the group (much faster)
    and the same model in another group (failing half its requests) must not be the yardstick."""
    started, since = NOW - 100, NOW - 30
    fleet.record("canary", started - 50, [10.0] * 100, version=1)  # its own baseline, before the rollout
    fleet.record("canary", since + 5, [11.0] * 200, version=2)
    fleet.record("peer", since + 5, [10.0] * 200, version=1)  # the control in the window
    fleet.record("peer", started - 3000, [1.0] * 5000, version=1)  # too old: not in either window
    fleet.record("other-model", since + 5, [1.0] * 5000, model="speech", version=1)
    fleet.record("elsewhere", since + 5, [1.0] * 5000, errors=2500, version=1, group="b")
    reason, summary = health_verdict(fleet.db, ["canary"], "digits", "a", 2, [1], since, NOW, started)
    assert reason == "", summary
    assert "control (v1 in group a): 300 requests, error rate 0.00%" in summary, summary
    # the same canary, 40% slower than its real control, halts
    fleet.record("canary", since + 10, [15.0] * 2000, version=2)
    reason, summary = health_verdict(fleet.db, ["canary"], "digits", "a", 2, [1], since, NOW, started)
    assert reason.startswith("p95"), summary


def test_a_sub_millisecond_p95_must_also_grow_by_the_absolute_slack(fleet):
    """0.3 ms -> 0.5 ms is 67% slower and only 0.2 ms: host jitter, not a regression; the same canary passes
    with the default 1 ms slack and halts when the operator asks for none."""
    started, since = NOW - 100, NOW - 30
    fleet.record("peer", since + 5, [0.3] * 400, version=1)
    fleet.record("canary", since + 5, [0.5] * 400, version=2)
    reason, summary = health_verdict(fleet.db, ["canary"], "digits", "a", 2, [1], since, NOW, started)
    assert reason == "", summary
    reason, _ = health_verdict(fleet.db, ["canary"], "digits", "a", 2, [1], since, NOW, started,
                               Thresholds(min_p95_increase_ms=0.0))
    assert reason.startswith("p95 5"), reason


def _classes(rng, p, n=400):
    return np.bincount(rng.choice(10, size=n, p=p), minlength=10)


def test_a_model_that_answers_differently_halts_though_not_slower_nor_failing(fleet):
    """Traffic is mostly digits 0-2. v2 answers class+1 (an off-by-one label map): same speed, no errors."""
    rng = np.random.default_rng(1)
    p = np.array([0.3, 0.3, 0.2] + [0.2 / 7] * 7)
    since = NOW - 30
    fleet.record("peer", since + 1, [5.0] * 400, version=1, classes=_classes(rng, p))
    fleet.record("canary", since + 1, [5.0] * 400, version=2, classes=_classes(rng, p))
    assert health_verdict(fleet.db, ["canary"], "digits", "a", 2, [1], since, NOW, NOW - 100)[0] == ""
    fleet.record("canary", since + 2, [5.0] * 400, version=2, classes=np.roll(_classes(rng, p), 1))
    fleet.record("peer", since + 2, [5.0] * 400, version=1, classes=_classes(rng, p))
    reason, summary = health_verdict(fleet.db, ["canary"], "digits", "a", 2, [1], since, NOW, NOW - 100)
    assert "predicted classes of 'probs' differ" in reason, summary
    # a looser threshold lets it through: the threshold is the rollout's option
    loose = Thresholds(max_class_psi=50.0)
    assert health_verdict(fleet.db, ["canary"], "digits", "a", 2, [1], since, NOW, NOW - 100, loose)[0] == ""


def test_inputs_unlike_the_new_models_reference_halt(fleet):
    """Both sides see the same inputs; v2's reference says they should look different (a preprocessing
    change): its input PSI rises while the control's stays low."""
    since = NOW - 30
    fleet.record("peer", since + 1, [5.0] * 100, version=1, inputs=[250, 250, 250, 250])
    fleet.record("canary", since + 1, [5.0] * 100, version=2, inputs=[900, 50, 25, 25])
    reason, summary = health_verdict(fleet.db, ["canary"], "digits", "a", 2, [1], since, NOW, NOW - 100)
    assert "inputs are further from the new model's reference" in reason, summary


def test_drift_uses_the_same_window_as_p95_everywhere(fleet):
    """A flagged record 100 s ago and a record without a drift score (no traffic) 5 s ago: the device is
    drifting in the 300 s window — in the JSON, the table and the footer alike; outside the window it is not."""
    fleet.record("pi-1", NOW - 100, [2.0] * 60, drift=4.29)
    fleet.record("pi-1", NOW - 5, [])
    (row,) = status(fleet.db, window=300, now=NOW)
    assert row["drift"] is True and row["max_psi"] == pytest.approx(4.29)
    text = table([row], now=NOW, window=300)
    assert "YES 4.29" in text and "1 devices, 0 online, 1 drifting" in text and "last 300 s" in text
    (row,) = status(fleet.db, window=60, now=NOW)
    assert row["drift"] is False and row["max_psi"] is None and "-" in table([row], now=NOW, window=60)


def test_report_plots_say_what_they_show(fleet, tmp_path):
    """No failed requests: a sentence, not an empty axis; two start-up outliers: log axis; device counts:
    integer ticks; a device with a single drift score: a visible marker."""
    from toolkit.fleet.report_plots import plots
    from toolkit.fleet.views import write_report

    for i in range(30):
        for dev in ("pi-1", "pi-2", "pi-3"):
            slow = i < 1 and dev != "pi-3"  # two start-up outliers
            fleet.record(dev, NOW - 300 + 10 * i, [900.0 if slow else 2.0] * 20,
                         drift=3.0 if (dev == "pi-3" and i == 10) else None)
    tele = fleet.db.execute("SELECT * FROM telemetry ORDER BY t").fetchall()
    fig = plots(tele)
    p95, _, failed, devices, drift = fig.axes
    assert p95.get_yscale() == "log"
    assert any("no failed requests" in t.get_text() for t in failed.texts) and not failed.patches
    ticks = [t for t in devices.get_yticks() if devices.get_ylim()[0] <= t <= devices.get_ylim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks)
    (line,) = [ln for ln in drift.lines if ln.get_label() == "pi-3"]
    assert len(line.get_xdata()) == 1 and line.get_marker() == "o"
    out = write_report(tmp_path / "fleet.db", tmp_path / "r.html", window=600, now=NOW)
    html = out.read_text()
    assert "YES 3.00" in html and "The last 600 s" in html and "data:image/png;base64," in html
    assert out.stat().st_mode & 0o777 == 0o644 & ~_umask()


def _umask() -> int:
    import os

    m = os.umask(0o022)
    os.umask(m)
    return m


def test_read_commands_refuse_a_missing_database(tmp_path):
    from click.testing import CliRunner

    from toolkit.cli import cli

    for cmd in (["fleet", "status"], ["fleet", "watch", "--iterations", "1"], ["fleet", "report"]):
        res = CliRunner().invoke(cli, ["--home", str(tmp_path / "h"), *cmd, "--db", str(tmp_path / "typo.db")])
        assert res.exit_code == 1 and "no fleet database there" in res.output, res.output
    assert not (tmp_path / "typo.db").exists()


def _labels(fleet, device, version, right, wrong, received):
    """Field labels as a device sends them (one labelled request per sample), stored by the collector."""
    from agent.fleet.protocol import label_doc
    from toolkit.fleet.collector import parse_many

    for i in range(right + wrong):
        fleet.seq[device + "/l"] = n = fleet.seq.get(device + "/l", 0) + 1
        doc = label_doc(device, f"{device}-{n}", "digits", version, received - 1, [3], [3 if i < right else 5], [0.8],
                        False)
        for kind, row in parse_many("f", device_topic("f", device, "label"), telemetry_payload(doc, n, 0),
                                    now=received):
            fleet.db.execute(SQL[kind], row)
    fleet.db.commit()


def test_live_accuracy_halts_a_wave_once_both_sides_have_enough_labels(fleet):
    """Same speed, same classes counted, but the field labels say v2 is right less often than v1 in the
    same group: 80% vs 95%. Compared only once each side has --min-labels labelled samples."""
    since = NOW - 30
    fleet.record("peer", since + 1, [5.0] * 100, version=1)
    fleet.record("canary", since + 1, [5.0] * 100, version=2)
    _labels(fleet, "peer", 1, 38, 2, since + 2)
    _labels(fleet, "canary", 2, 32, 8, since + 2)
    reason, summary = health_verdict(fleet.db, ["canary"], "digits", "a", 2, [1], since, NOW, NOW - 100)
    assert reason == "" and "fewer than 50 labels on a side: no accuracy verdict" in summary, summary
    _labels(fleet, "peer", 1, 57, 3, since + 3)
    _labels(fleet, "canary", 2, 48, 12, since + 3)
    _labels(fleet, "elsewhere", 1, 0, 100, since + 3)  # another group's labels are not the control
    fleet.record("elsewhere", since + 1, [5.0] * 100, version=1, group="b")
    reason, summary = health_verdict(fleet.db, ["canary"], "digits", "a", 2, [1], since, NOW, NOW - 100)
    assert reason.startswith("live accuracy 80.00% vs 95.00%"), summary
    loose = Thresholds(max_accuracy_drop=0.2)
    assert health_verdict(fleet.db, ["canary"], "digits", "a", 2, [1], since, NOW, NOW - 100, loose)[0] == ""
    few = Thresholds(min_labels=500)
    assert health_verdict(fleet.db, ["canary"], "digits", "a", 2, [1], since, NOW, NOW - 100, few)[0] == ""
