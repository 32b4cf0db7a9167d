"""docs/metrics.md lists exactly the metrics of vllm_recroute/metrics/names.py, with their
types and extra labels, and says what the code counts where a line of it is checkable."""

from __future__ import annotations

import re
from pathlib import Path

from vllm_recroute.metrics.names import METRICS

DOC = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"
# | `recroute:name[_total]` | type | `label`, `label` | meaning |
ROW = re.compile(r"^\|\s*`(recroute:[\w:]+)`\s*\|\s*(\w+)\s*\|([^|]*)\|(.*)\|\s*$")


def documented(text: str) -> dict[str, tuple[str, tuple[str, ...]]]:
    """Metric name on /metrics -> (type, extra labels) from the doc's table."""
    out = {}
    for line in text.splitlines():
        m = ROW.match(line)
        if m:
            labels = tuple(re.findall(r"`(\w+)`", m.group(3)))
            out[m.group(1)] = (m.group(2), labels)
    return out


def exported(spec) -> str:
    """The name Prometheus shows: counters get ``_total``."""
    return spec.name + "_total" if spec.kind == "counter" else spec.name


def test_the_doc_lists_every_metric_with_its_type_and_labels():
    doc = documented(DOC.read_text())
    code = {exported(m): (m.kind, m.labels) for m in METRICS}
    assert sorted(doc) == sorted(code), (
        f"in names.py only: {sorted(set(code) - set(doc))}; "
        f"in the doc only: {sorted(set(doc) - set(code))}"
    )
    wrong = {n: (doc[n], code[n]) for n in code if doc[n] != code[n]}
    assert not wrong, f"(doc, names.py) type and labels differ: {wrong}"


def test_the_doc_says_which_metrics_are_gauges():
    """The prose above the table must not call every metric a counter."""
    text = DOC.read_text()
    gauges = [m.name for m in METRICS if m.kind == "gauge"]
    assert gauges, "names.py has gauges"
    assert "All are counters" not in text
    for name in gauges:
        assert f"`{name}` | gauge |" in text


def test_the_table_parser_is_not_vacuous():
    """Guard: a row of the doc's shape is read, a missing metric and a wrong type show."""
    text = (
        "| `recroute:visual_tokens_total` | counter | | Visual tokens. |\n"
        "| `recroute:routed_requests_total` | gauge | `mode`, `schedule` | Prompts. |\n"
    )
    assert documented(text) == {
        "recroute:visual_tokens_total": ("counter", ()),
        "recroute:routed_requests_total": ("gauge", ("mode", "schedule")),
    }
    assert len(documented(DOC.read_text())) > 10
