"""A variant's `reference:`: the original report's numbers and findings, checked against
what a study measured.

    reference:
      source: "000_347117b93a658727.txt, part 2 (beta-VAE), table 1"
      note: "the report's best beta came from a sign error; compared on the beta=1 ELBO"
      metric: test_recon          # the default metric of `values` and `findings`
      values:                     # the report's numbers, one per configuration
        - {point: {beta: 0.6}, value: 151.2}
        - {point: {beta: 1.0}, value: 148.9, metric: test_elbo}
      findings:
        - {text: "a larger beta reconstructs worse", order: [{beta: 0.6}, {beta: 1.8}],
           better: lower}
        - {text: "validation ELBO >= -102 nats", metric: val_elbo, point: {}, at_least: -102}

A point matches a configuration when every key it names has that value; `{}` matches every
configuration of the study. A finding holds when the measured means obey it (an order of
points by `better`, or a threshold `at_least` / `at_most`), is refuted when they do not,
and is "not measured" when the study lacks the metric (a test metric before `bench eval`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

FINDING_KEYS = {"text", "metric", "order", "better", "point", "at_least", "at_most"}
TOP_KEYS = {"source", "note", "metric", "split", "values", "findings"}


@dataclass(frozen=True)
class Reference:
    source: str
    metric: str
    values: list[dict[str, Any]] = field(default_factory=list)
    findings: list[dict[str, Any]] = field(default_factory=list)
    note: str = ""

    def match(self, table: pd.DataFrame) -> list[dict[str, Any]]:
        """Per configuration of the ranked table: the report's number for it, if any."""
        out: list[dict[str, Any]] = []
        for _, row in table.iterrows():
            hit = next((v for v in self.values if matches(row, v.get("point", {}))), None)
            if hit is None:
                out.append({})
                continue
            metric = hit.get("metric", self.metric)
            out.append({"metric": metric, "value": hit["value"],
                        "text": f"{hit['value']:.4g} ({metric})"})
        return out


def parse_reference(raw: Any, where: str, metrics: Mapping[str, Any] | None,
                    errs: list[str]) -> Reference | None:
    """Check a `reference:` mapping; problems are appended to `errs`."""
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        errs.append(f"{where}: must be a mapping (source, metric, values, findings), got "
                    f"{raw!r}")
        return None
    for key in sorted(set(raw) - TOP_KEYS):
        errs.append(f"{where}: unknown key `{key}`; allowed: {', '.join(sorted(TOP_KEYS))}")
    metric = raw.get("metric")
    _check_metric(f"{where}.metric", metric, metrics, errs, required=False)
    values = raw.get("values") or []
    if not isinstance(values, list):
        errs.append(f"{where}.values: must be a list, got {values!r}")
        values = []
    for i, v in enumerate(values):
        w = f"{where}.values[{i}]"
        if not isinstance(v, Mapping) or not isinstance(v.get("value"), (int, float)):
            errs.append(f"{w}: must be a mapping with a numeric `value`, got {v!r}")
            continue
        _check_point(w, v.get("point", {}), errs)
        _check_metric(f"{w}.metric", v.get("metric", metric), metrics, errs)
    findings = raw.get("findings") or []
    if not isinstance(findings, list):
        errs.append(f"{where}.findings: must be a list, got {findings!r}")
        findings = []
    for i, f in enumerate(findings):
        _check_finding(f"{where}.findings[{i}]", f, metric, metrics, errs)
    return Reference(str(raw.get("source", "")), str(metric or ""), list(values),
                     list(findings), str(raw.get("note", "")))


def _check_metric(where: str, metric: Any, metrics: Mapping[str, Any] | None, errs: list[str],
                  required: bool = True) -> None:
    if metric is None:
        if required:
            errs.append(f"{where}: name the metric (here or in the reference's `metric`)")
        return
    if metrics is not None and metric not in metrics:
        errs.append(f"{where}: {metric!r} is not a metric of the task; known: "
                    f"{', '.join(sorted(metrics))}")


def _check_point(where: str, point: Any, errs: list[str]) -> None:
    if not isinstance(point, Mapping):
        errs.append(f"{where}.point: must be a mapping of parameter values, got {point!r}")


def _check_finding(where: str, f: Any, metric: Any, metrics: Mapping[str, Any] | None,
                   errs: list[str]) -> None:
    if not isinstance(f, Mapping) or not isinstance(f.get("text"), str):
        errs.append(f"{where}: must be a mapping with a `text`, got {f!r}")
        return
    for key in sorted(set(f) - FINDING_KEYS):
        errs.append(f"{where}: unknown key `{key}`; allowed: {', '.join(sorted(FINDING_KEYS))}")
    _check_metric(f"{where}.metric", f.get("metric", metric), metrics, errs)
    if "order" in f:
        order = f["order"]
        if not isinstance(order, list) or len(order) < 2:
            errs.append(f"{where}.order: must list two or more points, got {order!r}")
        else:
            for p in order:
                _check_point(where, p, errs)
        if f.get("better") not in ("lower", "higher"):
            errs.append(f"{where}.better: must be lower or higher, got {f.get('better')!r}")
    elif "at_least" in f or "at_most" in f:
        _check_point(where, f.get("point", {}), errs)
    else:
        errs.append(f"{where}: give `order` (with `better`) or a threshold `at_least`/`at_most`")


def matches(row: Mapping[str, Any] | pd.Series, point: Mapping[str, Any]) -> bool:
    for key, want in point.items():
        got = row.get(f"param_{key}")
        if got is None or (isinstance(got, float) and math.isnan(got)):
            return False
        if isinstance(want, (int, float)) and not isinstance(want, bool):
            if not math.isclose(float(got), float(want), rel_tol=1e-9, abs_tol=1e-12):
                return False
        elif got != want:
            return False
    return True


def _mean_at(table: pd.DataFrame, point: Mapping[str, Any], metric: str) -> float | None:
    col = f"metric_{metric}"
    if col not in table:
        return None
    hits = [r[col] for _, r in table.iterrows() if matches(r, point)
            and not (isinstance(r[col], float) and math.isnan(r[col]))]
    return float(sum(hits) / len(hits)) if hits else None


def evaluate_findings(ref: Reference, table: pd.DataFrame) -> list[dict[str, Any]]:
    out = []
    for f in ref.findings:
        metric = f.get("metric", ref.metric)
        holds, detail = None, ""
        if "order" in f:
            found = [_mean_at(table, p, metric) for p in f["order"]]
            means = [m for m in found if m is not None]
            if len(means) == len(found):
                sign = 1 if f["better"] == "lower" else -1
                holds = all(sign * (a - b) < 0 for a, b in zip(means, means[1:], strict=False))
                detail = f"{metric}: " + " < ".join(f"{m:.4g}" for m in means) if sign == 1 \
                    else f"{metric}: " + " > ".join(f"{m:.4g}" for m in means)
        else:
            m = _mean_at(table, f.get("point", {}), metric)
            if m is not None:
                holds = (("at_least" not in f or m >= f["at_least"])
                         and ("at_most" not in f or m <= f["at_most"]))
                detail = f"{metric} = {m:.4g}"
        out.append({"text": f["text"], "holds": holds, "detail": detail, "metric": metric})
    return out


def reference_for(task: str, variant: str) -> Reference | None:
    """The `reference:` of the task's variant in its shipped space, or None."""
    from bench.errors import ConfigError
    from bench.space import space_for

    try:
        space = space_for(task)
    except ConfigError:
        return None
    v = space.variants.get(variant)
    return v.reference if v is not None and isinstance(v.reference, Reference) else None
