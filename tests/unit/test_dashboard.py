"""The Grafana dashboard in docs/ asks only for metrics that the web tier and the workers export."""

from __future__ import annotations

import json
import re

from prometheus_client import REGISTRY

import app.web.metrics  # noqa: F401  (registers the web tier's metrics)
import workers.metrics  # noqa: F401  (registers the workers')
from config.settings import ROOT

# Read from Redis at each scrape (app.web.metrics.QueueCollector), not registered globally.
SCRAPED = {"chat_queue_depth", "chat_workers_live"}


def exported() -> set[str]:
    names = set(SCRAPED)
    suffixes = {"histogram": ("_bucket", "_count", "_sum"), "counter": ("_total",), "gauge": ("",)}
    for family in REGISTRY.collect():  # a labelled metric has no samples before its first labels: by its type
        names |= {family.name + suffix for suffix in suffixes.get(family.type, ("",))}
    return names


def test_every_panel_queries_exported_metrics():
    dashboard = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {name for e in exprs for name in re.findall(r"\b(chat_[a-z_]+)", e)}
    assert len(dashboard["panels"]) >= 8 and used
    assert used <= exported(), used - exported()
