"""deploy/: the alerting rules pass promtool and their unit tests; the dashboard is sound.

Both files name metrics by string, so they are checked against what voxrelay declares:
a renamed metric breaks a test here, not a panel in production.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.servers import ROOT
from voxrelay.service import metrics

DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana-dashboard.json"
ALERTS = DEPLOY / "alerts.yml"
ALERT_TESTS = DEPLOY / "alerts_test.yml"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="needs promtool: `make test-deps` installs it (Debian package prometheus)",
)
METRIC_NAME = re.compile(r"\b(?:voxrelay|process|python)_[a-z_]+[a-z]\b")
#: Grafana's variables, replaced by values that make a valid PromQL expression.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$job": ".*", "$instance": ".*"}


def promtool(*args: str, cwd: Path = DEPLOY) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def exposed_names() -> set[str]:
    """Every family and sample name the registry can expose, children or not."""
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_count", "_sum"),
        "info": ("_info",),
    }
    names: set[str] = set()
    for family in metrics.REGISTRY.collect():
        names.add(family.name)
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
        names.update(s.name for s in family.samples)
    return names


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def exprs() -> list[str]:
    return [t["expr"] for p in panels() for t in p["targets"]]


# Alerts


@needs_promtool
def test_the_alerting_rules_are_valid() -> None:
    result = promtool("check", "rules", ALERTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@needs_promtool
def test_every_alert_passes_its_unit_tests() -> None:
    result = promtool("test", "rules", ALERT_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_unit_test() -> None:
    alerts = set(re.findall(r"^\s*- alert: (\w+)", ALERTS.read_text(), re.MULTILINE))
    tested = set(re.findall(r"^\s*alertname: (\w+)", ALERT_TESTS.read_text(), re.MULTILINE))
    assert alerts == {
        "VoxrelayTimeToFirstAudioHigh",
        "VoxrelayUpstreamErrorRate",
        "VoxrelayCircuitBreakerOpen",
        "VoxrelayTokenBudgetExceeded",
        "VoxrelayCharacterBudgetExceeded",
        "VoxrelayLimitsBackendDown",
    }
    assert tested == alerts


def test_the_alerts_name_only_metrics_voxrelay_exports() -> None:
    named = set(METRIC_NAME.findall(ALERTS.read_text()))
    assert named and named <= exposed_names(), named - exposed_names()


# The dashboard


def test_the_dashboard_uses_a_prometheus_datasource_variable() -> None:
    board = dashboard()
    [variable] = [v for v in board["templating"]["list"] if v["type"] == "datasource"]
    assert variable["query"] == "prometheus"
    ref = {"type": "prometheus", "uid": f"${{{variable['name']}}}"}
    for panel in panels():
        assert panel["datasource"] == ref, panel["title"]
        assert all(t["datasource"] == ref for t in panel["targets"]), panel["title"]
    assert board["uid"] == "voxrelay" and board["schemaVersion"] >= 36


def test_the_dashboard_has_the_main_panels() -> None:
    titles = {p["title"] for p in panels()}
    assert {
        "Time to first audio (p50, p99)",
        "Active streams",
        "Request rate by outcome",
        "Upstream first byte by stage (p50, p99)",
        "Tokens per hour",
        "Characters per hour",
    } <= titles
    ids = [p["id"] for p in dashboard()["panels"]]
    assert len(ids) == len(set(ids))


def test_the_dashboard_names_only_metrics_voxrelay_exports() -> None:
    named = {name for expr in exprs() for name in METRIC_NAME.findall(expr)}
    assert "voxrelay_time_to_first_audio_seconds_bucket" in named
    assert named <= exposed_names(), named - exposed_names()


@needs_promtool
def test_the_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    rules = []
    for i, expr in enumerate(exprs()):
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, expr
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard_rules.yml"
    # JSON is YAML: promtool reads it as a rule file.
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = promtool("check", "rules", path.name, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
