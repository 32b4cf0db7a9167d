"""deploy/ against a live server: a real Prometheus scrapes `vllm-recroute serve`, and every
PromQL expression of the Grafana dashboard and of deploy/prometheus/rules.yml is evaluated.

- dashboard targets and recording rules: must return data (a non-empty result with at least
  one number that is not NaN), after a few routed chat requests with images;
- alert rules: their normal state is "no data" (they select a problem), so only the query
  is checked: Prometheus accepts it (status "success");
- `promtool check config`, `promtool check rules`, `promtool test rules` exit 0.

Prometheus must be installed (`.ci/install-prometheus.sh`; CI runs it): without it these
tests fail, they are not skipped.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
import requests
import yaml

from tests.e2e.helpers import API_KEY, free_port, messages, stop
from vllm_recroute.metrics.names import METRICS

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
PROM_DIR = ROOT / "deploy" / "prometheus"
PROM_CONFIG = PROM_DIR / "prometheus.yml"
RULES = PROM_DIR / "rules.yml"
RULES_TEST = PROM_DIR / "rules.test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "vllm-recroute.json"
JOB = "vllm-recroute"
SERVED_MODEL = "tiny"  # --served-model-name of the session server (conftest.py)

# Values for Grafana's variables in the dashboard's queries. `instance` is filled in with
# the scraped target once it is known.
GRAFANA_VARS = {
    "__rate_interval": "1m",
    "__interval": "1s",
    "__range": "5m",
    "model_name": SERVED_MODEL,
    "instance": ".*",
}
_VAR = re.compile(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)")
READY_TIMEOUT_S = 30
SCRAPE_WAIT_S = 30


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"`{name}` is not on PATH: run .ci/install-prometheus.sh (installs Debian's "
            "prometheus package; CI runs it)",
            pytrace=False,
        )
    return path


# -- expressions ---------------------------------------------------------------------------
def _walk_panels(panels: list[dict]):
    for panel in panels:
        yield panel
        yield from _walk_panels(panel.get("panels") or [])


def dashboard_targets() -> list[tuple[str, str]]:
    """(id, expr) of every query target of every panel, rows' nested panels included."""
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for panel in _walk_panels(dash["panels"]):
        for target in panel.get("targets") or []:
            if target.get("expr"):
                out.append((f"{panel['title']}/{target.get('refId', '?')}", target["expr"]))
    return out


def rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def recording_rules() -> list[tuple[str, str]]:
    return [(r["record"], r["expr"]) for r in rules() if "record" in r]


def alert_rules() -> list[tuple[str, str]]:
    return [(r["alert"], r["expr"]) for r in rules() if "alert" in r]


def substitute(expr: str, values: dict[str, str]) -> str:
    def one(m: re.Match) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        if name not in values:
            raise AssertionError(f"dashboard variable ${name} has no value in GRAFANA_VARS")
        return values[name]

    return _VAR.sub(one, expr)


def _ids(pairs):
    return [p[0] for p in pairs]


# -- static checks (no server) -------------------------------------------------------------
def test_promtool_check_config_rules_and_rule_unit_tests():
    promtool = _binary("promtool")
    for args in (
        ["check", "config", str(PROM_CONFIG)],
        ["check", "rules", str(RULES)],
        ["test", "rules", str(RULES_TEST)],
    ):
        # `test rules` resolves rule_files relative to the working directory.
        res = subprocess.run(
            [promtool, *args], cwd=PROM_DIR, capture_output=True, text=True, timeout=60
        )
        assert res.returncode == 0, f"promtool {' '.join(args)}:\n{res.stdout}\n{res.stderr}"


def test_dashboard_and_rules_use_only_known_metric_names_and_show_every_metric():
    exported = {m.name + ("_total" if m.kind == "counter" else "") for m in METRICS}
    exprs = [e for _, e in dashboard_targets() + recording_rules() + alert_rules()]
    # Raw plugin metrics have one ':' (recroute:name); recorded series have two.
    used = {n for e in exprs for n in re.findall(r"recroute:[a-z_]+(?::[a-z0-9_]+)?", e)}
    raw = {n for n in used if n.count(":") == 1}
    recorded = {name for name, _ in recording_rules()}
    assert raw <= exported, f"unknown plugin metrics: {sorted(raw - exported)}"
    assert used - raw <= recorded, f"unknown recorded series: {sorted(used - raw - recorded)}"
    on_dashboard = {n for _, e in dashboard_targets() for n in re.findall(r"recroute:\w+", e)}
    assert exported <= on_dashboard, f"not on the dashboard: {sorted(exported - on_dashboard)}"


def test_dashboard_datasource_is_a_variable():
    dash = json.loads(DASHBOARD.read_text())
    for panel in _walk_panels(dash["panels"]):
        if panel.get("type") == "row":
            continue
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
    names = {v["name"] for v in dash["templating"]["list"]}
    assert {"DS_PROMETHEUS", "model_name", "instance"} <= names


# -- live: Prometheus scraping the session server ---------------------------------------------
def test_metrics_endpoint_needs_no_api_key(server):
    # vLLM's --api-key guards /v1, /v2, /inference, /cohere only: Prometheus scrapes /metrics
    # without credentials (deploy/prometheus/prometheus.yml sets none).
    res = requests.get(server["base"] + "/metrics", timeout=10)
    assert res.status_code == 200
    assert "vllm:num_requests_running" in res.text


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory):
    binary = _binary("prometheus")
    target = urlparse(server["base"]).netloc
    work = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load(PROM_CONFIG.read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(RULES)]
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == JOB]
    job["static_configs"] = [{"targets": [target], "labels": {"deployment": "test"}}]
    job["scrape_timeout"] = "1s"
    # Not needed by vLLM (/metrics is open) but harmless; what a guarded proxy would need.
    job["authorization"] = {"type": "Bearer", "credentials": API_KEY}
    config_path = work / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    port = free_port()
    log = work / "prometheus.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={work / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + READY_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"prometheus exited {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if requests.get(base + "/-/ready", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.time() < deadline, f"prometheus not ready:\n{log.read_text()[-3000:]}"
            time.sleep(0.2)
        yield {"base": base, "target": target, "log": log}
    finally:
        stop(proc, timeout=20)


def query(prom: dict, expr: str) -> dict:
    res = requests.get(prom["base"] + "/api/v1/query", params={"query": expr}, timeout=10)
    body = res.json()
    assert res.status_code == 200 and body.get("status") == "success", f"{expr}\n-> {body}"
    return body["data"]


def _wait_for(prom: dict, expr: str, ok, what: str) -> list:
    deadline = time.time() + SCRAPE_WAIT_S
    while True:
        result = query(prom, expr)["result"]
        if ok(result):
            return result
        assert time.time() < deadline, f"{what}: `{expr}` gave {result}\n{prom['log']}"
        time.sleep(0.5)


PER_REQUEST = [None, {"recroute_schedule": "fastv"}, {"recroute_mode": "reroute"}]


def _send_routed_requests(client) -> None:
    for seed, xargs in enumerate(PER_REQUEST, start=1):
        extra = {"ignore_eos": True}
        if xargs:
            extra["vllm_xargs"] = xargs
        out = client.chat.completions.create(
            model=SERVED_MODEL,
            messages=messages(seed),
            max_tokens=4,
            temperature=0,
            extra_body=extra,
        )
        assert out.usage.completion_tokens == 4


def _wait_for_scrape_after(prom: dict, t: float) -> None:
    """Until a scrape that started more than 1 s after `t` is stored (two scrapes at 1 s)."""
    _wait_for(
        prom,
        f'timestamp(up{{job="{JOB}"}})',
        lambda r: r and float(r[0]["value"][1]) > t + 1.0,
        "no scrape after the requests",
    )


@pytest.fixture(scope="module")
def scraped(prometheus, client):
    """Prometheus holds samples from before and after a few routed requests with images."""
    up = f'up{{job="{JOB}"}}'
    _wait_for(prometheus, up, lambda r: r and r[0]["value"][1] == "1", "target not up")
    # Labelled series (mode/schedule, stage) appear on their first increment; a series'
    # first sample is no increase for rate(). A first round creates them and a scrape takes
    # the baseline; the second round is what the rates see.
    _send_routed_requests(client)
    _wait_for_scrape_after(prometheus, time.time())
    _send_routed_requests(client)
    _wait_for_scrape_after(prometheus, time.time())
    return {**prometheus, "vars": {**GRAFANA_VARS, "instance": prometheus["target"]}}


def _assert_has_number(scraped: dict, expr: str) -> None:
    data = query(scraped, expr)
    values = [float(s["value"][1]) for s in data["result"]]
    assert values, f"no data for `{expr}`"
    assert any(not math.isnan(v) for v in values), f"only NaN for `{expr}`: {data['result']}"


@pytest.mark.parametrize(("panel", "expr"), dashboard_targets(), ids=_ids(dashboard_targets()))
def test_dashboard_query_returns_data(scraped, panel, expr):
    _assert_has_number(scraped, substitute(expr, scraped["vars"]))


@pytest.mark.parametrize(("record", "expr"), recording_rules(), ids=_ids(recording_rules()))
def test_recording_rule_returns_data(scraped, record, expr):
    _assert_has_number(scraped, expr)
    # ... and Prometheus itself records it (rules are evaluated every second here).
    _wait_for(scraped, record, bool, f"recording rule {record} has no series")


@pytest.mark.parametrize(("alert", "expr"), alert_rules(), ids=_ids(alert_rules()))
def test_alert_rule_query_is_valid(scraped, alert, expr):
    # Normal state of an alert expression is "no data": check only that it evaluates.
    data = query(scraped, expr)
    assert data["resultType"] == "vector", alert


def test_prometheus_loaded_the_rules_without_errors(scraped):
    res = requests.get(scraped["base"] + "/api/v1/rules", timeout=10).json()
    loaded = [r for g in res["data"]["groups"] for r in g["rules"]]
    assert len(loaded) == len(rules())
    bad = [(r["name"], r.get("lastError")) for r in loaded if r.get("health") == "err"]
    assert not bad, bad
