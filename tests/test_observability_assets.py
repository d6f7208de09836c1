"""The observability assets: alert rules, their unit tests, the Grafana dashboards.

- ``promtool check rules`` and ``promtool test rules`` pass on deploy/prometheus/.
- Every dashboard is valid Grafana JSON with unique panel ids, a datasource on every panel and a
  PromQL ``expr`` on every target; every expression compiles (promtool checks them as recording
  rules in a temporary file).
- Every metric name that a dashboard or a rule uses is one the gateway really exposes: the test
  serves traffic through the gateway (a failover, a stream, a fallback) and reads GET /metrics.

promtool is required: CI installs it (Debian: ``apt-get install prometheus``). Without it these
tests fail, they do not skip. ``PROMTOOL=/path/to/promtool`` picks another binary.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from router.simulator import Simulator
from tests.conftest import MODEL, GatewayClock, sim_config
from tests.support import CLIENT_KEY, gateway
from tests.test_gateway import config_for, rejected

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
RULES_TEST = ROOT / "deploy" / "prometheus" / "rules_test.yml"
DASHBOARD_DIR = ROOT / "dashboards"
DASHBOARD_UIDS = {"overview.json": "router-overview", "key-detail.json": "router-key-detail"}
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
ALERTS = {
    "RouterPoolLow",
    "RouterPoolForecastBeforeReset",
    "RouterKeyDisabled",
    "RouterFreePoolSpentFallbackActive",
    "RouterUpstreamErrorRateHigh",
    "RouterOverheadHigh",
    "RouterStoreDown",
    "RouterPaidBudgetHigh",
    "RouterPaidBudgetSpent",
}

# Values for Grafana's variables, so that dashboard expressions become plain PromQL.
GRAFANA_VARIABLES = {
    "__rate_interval": "5m",
    "__interval": "1m",
    "__range": "6h",
    "datasource": "prometheus",
    "provider": "modelscope",
    "key": "alice",
}
VARIABLE = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")
LABEL_VALUES = re.compile(r"^\s*label_values\((?P<expr>.+),\s*(?P<label>\w+)\s*\)\s*$", re.S)
STRING_LITERAL = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
# A metric name of ours; not part of a recording rule name such as provider:router_x:sum.
METRIC_NAME = re.compile(r"(?<![\w:])router_[a-z0-9_]+(?![\w:])")
RECORDING_RULE_NAME = re.compile(r"(?<![\w:])[a-zA-Z_]\w*:[\w:]*(?![\w:])")
# The sample names a family of each type puts in the text format.
SAMPLE_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
}


# -- promtool -------------------------------------------------------------------------------


def promtool() -> str:
    """The promtool binary; a missing one fails the test (CI installs it)."""
    candidates = [os.environ.get("PROMTOOL"), shutil.which("promtool"), "/usr/bin/promtool"]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    pytest.fail(
        "promtool not found (looked at $PROMTOOL, PATH and /usr/bin/promtool). It is required: "
        "install it (Debian/Ubuntu: apt-get install prometheus) or set PROMTOOL=/path/to/promtool.",
        pytrace=False,
    )


def run_promtool(*args: str) -> str:
    result = subprocess.run(
        [promtool(), *args], capture_output=True, text=True, timeout=45, check=False
    )
    output = f"{result.stdout}\n{result.stderr}".strip()
    assert result.returncode == 0, f"promtool {' '.join(args)} failed:\n{output}"
    return output


# -- reading the assets ---------------------------------------------------------------------


def load_rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return [rule for group in data["groups"] for rule in group["rules"]]


def load_dashboard(path: Path) -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return dashboard


def dashboard_paths() -> list[Path]:
    return sorted(DASHBOARD_DIR.glob("*.json"))


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel that shows data, including those inside (collapsed) rows (a row itself only
    groups panels: it has a title and no query)."""
    for panel in panels:
        if panel.get("type") == "row":
            assert panel.get("title"), panel
            assert not panel.get("targets"), panel
        else:
            yield panel
        yield from all_panels(panel.get("panels", []))


def substitute(expr: str) -> str:
    """Replace Grafana variables ($__rate_interval, ${provider}, ...) with concrete values."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in GRAFANA_VARIABLES, f"unknown Grafana variable ${name} in {expr!r}"
        return GRAFANA_VARIABLES[name]

    return VARIABLE.sub(value, expr)


def variable_query(variable: dict[str, Any]) -> str | None:
    """The PromQL expression inside a query variable's label_values(expr, label), if any."""
    query = variable.get("query")
    if isinstance(query, dict):
        query = query.get("query")
    if not isinstance(query, str):
        return None
    match = LABEL_VALUES.match(query)
    return match.group("expr") if match else None


def dashboard_expressions(path: Path) -> list[tuple[str, str]]:
    """(where, expr) for every panel target and query variable of one dashboard."""
    dashboard = load_dashboard(path)
    found: list[tuple[str, str]] = []
    for panel in all_panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            where = f"{path.name} panel {panel['id']} ({panel['title']}) {target.get('refId')}"
            found.append((where, target["expr"]))
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            expr = variable_query(variable)
            assert expr is not None, f"{path.name} variable {variable['name']}: no label_values()"
            found.append((f"{path.name} variable {variable['name']}", expr))
    return found


def metric_names(expr: str) -> set[str]:
    return set(METRIC_NAME.findall(STRING_LITERAL.sub('""', expr)))


def used_metric_names() -> dict[str, set[str]]:
    """Every router_* metric name used by the dashboards and the rules, with where it is used."""
    used: dict[str, set[str]] = {}
    sources = [(f"rules.yml {r.get('alert') or r.get('record')}", r["expr"]) for r in load_rules()]
    for path in dashboard_paths():
        sources += dashboard_expressions(path)
    for where, expr in sources:
        for name in metric_names(expr):
            used.setdefault(name, set()).add(where)
    return used


def exposed_names(text: str) -> set[str]:
    """Every sample name the exposition declares, with or without samples yet."""
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(sample.name for sample in family.samples)
        names.update(family.name + suffix for suffix in SAMPLE_SUFFIXES.get(family.type, ("",)))
    return names


# -- alert rules ----------------------------------------------------------------------------


def test_promtool_check_rules() -> None:
    output = run_promtool("check", "rules", str(RULES))
    assert "SUCCESS" in output


def test_promtool_test_rules() -> None:
    output = run_promtool("test", "rules", str(RULES_TEST))
    assert "SUCCESS" in output


def test_alerts_have_severity_summary_and_description() -> None:
    rules = load_rules()
    alerts = {rule["alert"]: rule for rule in rules if "alert" in rule}
    assert set(alerts) == ALERTS
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert rule["annotations"]["summary"].strip(), name
        assert "$labels" in rule["annotations"]["description"] or name in {
            "RouterUpstreamErrorRateHigh",
            "RouterOverheadHigh",
        }, f"{name}: the description should name the provider/key/instance"
    assert alerts["RouterKeyDisabled"]["labels"]["severity"] == "critical"
    assert "binding" in alerts["RouterKeyDisabled"]["annotations"]["description"]
    # Recording rules the alerts use are defined in the same file.
    recorded = {rule["record"] for rule in rules if "record" in rule}
    for rule in rules:
        used = set(RECORDING_RULE_NAME.findall(STRING_LITERAL.sub('""', rule["expr"])))
        assert used <= recorded, f"{rule.get('alert') or rule['record']}: {used - recorded}"


# -- dashboards -----------------------------------------------------------------------------


def test_both_dashboards_exist() -> None:
    assert {path.name for path in dashboard_paths()} >= set(DASHBOARD_UIDS)


@pytest.mark.parametrize("name", sorted(DASHBOARD_UIDS))
def test_dashboard_is_valid(name: str) -> None:
    path = DASHBOARD_DIR / name
    dashboard = load_dashboard(path)
    assert dashboard["uid"] == DASHBOARD_UIDS[name]
    assert dashboard["schemaVersion"] == 39
    assert dashboard["editable"] is True
    assert "modelscope-router" in dashboard["tags"]
    assert dashboard["refresh"] == "30s"
    assert dashboard["time"]["from"] == "now-6h"
    assert dashboard["title"]

    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"] == DATASOURCE, variable["name"]

    panels = list(all_panels(dashboard["panels"]))
    assert panels, f"{name} has no panels"
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), f"{name}: duplicate panel ids {sorted(ids)}"
    for panel in panels:
        title = f"{name} panel {panel['id']} ({panel.get('title')})"
        assert panel.get("title"), title
        assert panel["datasource"] == DATASOURCE, title
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]), title
        targets = panel.get("targets")
        assert targets, f"{title}: no targets"
        ref_ids = [target["refId"] for target in targets]
        assert len(ref_ids) == len(set(ref_ids)), f"{title}: duplicate refIds"
        for target in targets:
            assert target["datasource"] == DATASOURCE, title
            assert isinstance(target.get("expr"), str), f"{title}: a target without expr"
            assert target["expr"].strip(), f"{title}: an empty expr"


def test_key_detail_variables() -> None:
    dashboard = load_dashboard(DASHBOARD_DIR / "key-detail.json")
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variable_query(variables["provider"]) == "router_quota_used"
    assert variable_query(variables["key"]) == 'router_quota_used{provider="$provider"}'
    assert variables["provider"]["query"].endswith(", provider)")
    assert variables["key"]["query"].endswith(", key)")


def test_dashboard_expressions_compile(tmp_path: Path) -> None:
    rules: list[dict[str, str]] = []
    where_of: dict[str, str] = {}
    for path in dashboard_paths():
        for index, (where, expr) in enumerate(dashboard_expressions(path)):
            record = f"dashboard:{path.stem.replace('-', '_')}:expr_{index}"
            where_of[record] = where
            rules.append({"record": record, "expr": substitute(expr)})
    assert len(rules) > 10
    rules_file = tmp_path / "dashboard_exprs.yml"
    rules_file.write_text(
        yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}), encoding="utf-8"
    )
    try:
        run_promtool("check", "rules", str(rules_file))
    except AssertionError as exc:
        mapping = "\n".join(f"  {record}: {where}" for record, where in where_of.items())
        raise AssertionError(f"{exc}\nrecording rule -> dashboard target:\n{mapping}") from None


STORE_MONEY_GAUGES = (
    "router_cost_today",
    "router_daily_budget",
    "router_client_tokens_today",
    "router_client_cost_today",
)


def test_store_tokens_and_cost_are_taken_once_across_replicas() -> None:
    """The tokens and cost of the day come from the store, alike on every replica: every use
    takes their max over the replicas first (a sum or a ratio of raw series would double)."""
    exprs = [rule["expr"] for rule in load_rules()]
    exprs += [expr for path in dashboard_paths() for _, expr in dashboard_expressions(path)]
    uses = 0
    for expr in exprs:
        for match in re.finditer("|".join(STORE_MONEY_GAUGES), expr):
            uses += 1
            before = expr[: match.start()]
            assert re.search(r"max by \([^)]*\) \($", before), expr
    assert uses >= 6


def test_overview_has_a_tokens_and_cost_row() -> None:
    panels = load_dashboard(DASHBOARD_DIR / "overview.json")["panels"]
    [row] = [
        i for i, p in enumerate(panels) if p["type"] == "row" and p["title"] == "Tokens and cost"
    ]
    below = panels[row + 1 :]
    row_y = panels[row]["gridPos"]["y"]
    assert all(p["gridPos"]["y"] > row_y for p in below)
    used = {name for p in below for t in p["targets"] for name in metric_names(t["expr"])}
    assert used == {
        "router_tokens_total",
        "router_cost_today",
        "router_daily_budget",
        "router_client_tokens_today",
        "router_client_cost_today",
    }


def test_quota_gauges_are_deduplicated() -> None:
    """Quota gauges are the same on every replica: never summed without max by (...) first."""
    gauges = (
        "router_quota_used",
        "router_quota_limit",
        "router_quota_remaining",
        "router_model_quota_used",
        "router_model_quota_limit",
        "router_model_quota_remaining",
        "router_key_state",
        *STORE_MONEY_GAUGES,
    )
    plain_sum = re.compile(
        r"\bsum\s*(?:(?:by|without)\s*\([^)]*\)\s*)?\(\s*(?:" + "|".join(gauges) + r")\b"
    )
    exprs = [rule["expr"] for rule in load_rules()]
    exprs += [expr for path in dashboard_paths() for _, expr in dashboard_expressions(path)]
    offenders = [expr for expr in exprs if plain_sum.search(expr)]
    assert not offenders, f"sum over a store gauge without max by (...) first: {offenders}"


# -- metric names against the real gateway --------------------------------------------------


async def gateway_exposition() -> str:
    """GET /metrics after real traffic: a failover (503), a stream, then the paid fallback."""
    clock = GatewayClock()
    async with Simulator(sim_config(2, 2), clock=clock.seconds) as sim:
        sim.faults.add("status_503", token="alice")
        providers: list[str] = []
        async with gateway(config_for(sim), clock) as url, aiohttp.ClientSession() as session:
            auth = {"Authorization": f"Bearer {CLIENT_KEY}"}
            for index in range(8):
                body = {
                    "model": MODEL,
                    "stream": index == 1,
                    "messages": [{"role": "user", "content": "hi"}],
                }
                async with session.post(
                    f"{url}/v1/chat/completions", json=body, headers=auth
                ) as response:
                    await response.read()
                    if response.status == 200:
                        providers.append(response.headers["x-router-provider"])
            async with session.get(f"{url}/metrics") as response:
                text = await response.text()
                assert response.status == 200, f"GET /metrics: {response.status} {text[:500]}"
        assert rejected(sim, "modelscope", "503") == 1, "the failover did not happen"
    assert "modelscope" in providers
    assert "bailian" in providers, f"no fallback to bailian: {providers}"
    return text


async def test_every_metric_used_is_exposed_by_the_gateway() -> None:
    used = used_metric_names()
    # the extraction itself works: the core names are found
    assert {
        "router_requests_total",
        "router_request_duration_seconds_bucket",
        "router_quota_remaining",
        "router_key_state",
    } <= set(used)
    exposed = exposed_names(await gateway_exposition())
    unknown = {name: sorted(where) for name, where in sorted(used.items()) if name not in exposed}
    assert not unknown, (
        "metric names used by dashboards/rules but not exposed by the gateway's GET /metrics: "
        + json.dumps(unknown, indent=2)
    )


def test_metric_name_extraction() -> None:
    expr = (
        'sum by (le) (rate(router_upstream_duration_seconds_bucket{kind!~"router_fake"}[5m]))'
        " / provider:router_quota_limit:sum + router_quota_used"
    )
    assert metric_names(expr) == {"router_upstream_duration_seconds_bucket", "router_quota_used"}
    text = (
        "# HELP router_x_total h\n# TYPE router_x_total counter\n"
        "# HELP router_h_seconds h\n# TYPE router_h_seconds histogram\n"
        "# HELP router_g h\n# TYPE router_g gauge\nrouter_g 1.0\n"
    )
    names = exposed_names(text)
    assert {"router_x_total", "router_h_seconds_bucket", "router_h_seconds_count"} <= names
    assert {"router_g", "router_h_seconds_sum"} <= names
    assert "router_x" not in names
    assert "router_g_total" not in names
