"""etc/grafana-dashboard.json: a valid dashboard model whose queries only name metrics a
running daemon really exports (scraped from its /metrics), and each of them documented."""

from __future__ import annotations

import json
import re
import smtplib
import urllib.request
from pathlib import Path

import pytest

from tests.daemon import QUIET_TAIL, Daemon, free_port
from tests.harness import PASSWORD, write_domain

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "etc" / "grafana-dashboard.json"

CONFIG = """
hostname = "mx.example.test"
local_domains = ["example.test"]
data_dir = "var"
domains_dir = "domains"
metrics = "127.0.0.1:{metrics_port}"

[listeners.mx]
endpoint = "127.0.0.1:{port}"
kind = "mx"
""" + QUIET_TAIL

_METRIC = re.compile(r"\bmta_[a-z0-9_]+\b")
# PromQL words that are not metric names never begin with mta_, so every
# mta_... word in an expression is a metric name.


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def queries(model: dict) -> list[str]:
    exprs = []
    for panel in model["panels"]:
        for target in panel.get("targets", []):
            exprs.append(target["expr"])
    return exprs


def exported_names(text: str) -> tuple[set[str], set[str]]:
    """(every series name a query may use, the metric family names) of an exposition."""
    series, families = set(), set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            if not name.endswith("_created"):  # prometheus_client's start time of each
                families.add(name)              # counter and histogram: not ours to document
            series |= {name + s for s in ("_bucket", "_sum", "_count")} if kind == "histogram" \
                else {name}
        elif line and not line.startswith("#"):
            series.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return series, families


@pytest.fixture(scope="module")
def scraped(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("grafana")
    write_domain(root / "domains", "example.test", {"alice": PASSWORD})
    port, metrics_port = free_port(), free_port()
    config = root / "mta.toml"
    config.write_text(CONFIG.format(port=port, metrics_port=metrics_port, dead_port=free_port()))
    daemon = Daemon(root, config, port)
    daemon.start()
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
            s.sendmail("s@remote.test", ["alice@example.test"], b"Subject: m\r\n\r\nbody\r\n")
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
            return r.read().decode()
    finally:
        daemon.terminate()


def test_the_dashboard_is_a_grafana_model() -> None:
    model = dashboard()
    assert model["title"] and model["uid"] and isinstance(model["schemaVersion"], int)
    ids = [p["id"] for p in model["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in model["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in model["panels"]:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24 and grid["h"] > 0
        if panel["type"] == "row":
            continue
        assert panel["type"] in ("timeseries", "stat")
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [t["refId"] for t in panel["targets"]]
        assert panel["targets"] and len(refs) == len(set(refs))
    # No two panels on the same grid cells.
    cells = set()
    for panel in model["panels"]:
        g = panel["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, panel["title"]
                cells.add((x, y))


def test_queries_use_only_exported_metrics_and_cover_them(scraped) -> None:
    series, families = exported_names(scraped)
    assert "mta_queue_messages" in series and "mta_messages_accepted_total" in series
    used = {name for expr in queries(dashboard()) for name in _METRIC.findall(expr)}
    assert used, "no query names a metric"
    unknown = used - series
    assert not unknown, f"the dashboard names metrics the daemon does not export: {unknown}"
    # And every metric the daemon exports has a panel.
    unused = {f for f in families
              if not any(u == f or u.startswith(f + "_") for u in used)}
    assert not unused, f"no panel for {unused}"


def test_every_exported_metric_is_documented(scraped) -> None:
    _, families = exported_names(scraped)
    readme = (ROOT / "README.rst").read_text()
    documented = set(re.findall(r"^``(mta_[a-z0-9_]+)``\s+(?:counter|gauge|histogram)", readme, re.M))
    assert families == documented
