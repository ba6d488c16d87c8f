"""Draw one trace from Jaeger's query API as an SVG waterfall (the picture in docs/observability.md).

The Jaeger that .ci/jaeger.sh builds has no web UI, so this draws what its JSON API returns:

    curl -s 'http://127.0.0.1:16686/api/traces/TRACE_ID' | python docs/render_trace.py > docs/trace.svg

One row per span, indented under its parent, with the bar placed on the trace's time axis, the
span's duration, the attributes that matter for routing (model, tokens, cost) and its events.
Standard library only.
"""

from __future__ import annotations

import json
import sys
from html import escape
from typing import Any

_ROW = 46
_LEFT = 330
_WIDTH = 1100
_TAGS = (
    "routesvc.selected_model",
    "routesvc.strategy",
    "routesvc.purpose",
    "gen_ai.usage.input_tokens",
    "gen_ai.usage.output_tokens",
    "routesvc.cost_usd",
    "routesvc.escalations",
    "rpc.grpc.status_code",
)
_SHORT = {
    "routesvc.selected_model": "selected",
    "routesvc.strategy": "strategy",
    "routesvc.purpose": "purpose",
    "gen_ai.usage.input_tokens": "in",
    "gen_ai.usage.output_tokens": "out",
    "routesvc.cost_usd": "USD",
    "routesvc.escalations": "escalations",
    "rpc.grpc.status_code": "status",
}
_COLOURS = {"server": "#4c78a8", "internal": "#72b7b2", "client": "#f58518"}


def _value(value: object) -> str:
    return f"{value:.8f}".rstrip("0") if isinstance(value, float) else str(value)


def _tags(span: dict[str, Any]) -> dict[str, Any]:
    return {tag["key"]: tag["value"] for tag in span.get("tags", [])}


def _ordered(spans: list[dict[str, Any]]) -> list[tuple[int, dict[str, Any]]]:
    children: dict[str | None, list[dict[str, Any]]] = {}
    ids = {span["spanID"] for span in spans}
    for span in spans:
        parent = next((r["spanID"] for r in span.get("references", []) if r["refType"] == "CHILD_OF"), None)
        children.setdefault(parent if parent in ids else None, []).append(span)
    ordered: list[tuple[int, dict[str, Any]]] = []

    def walk(parent: str | None, depth: int) -> None:
        for span in sorted(children.get(parent, []), key=lambda s: s["startTime"]):
            ordered.append((depth, span))
            walk(span["spanID"], depth + 1)

    walk(None, 0)
    return ordered


def render(trace: dict[str, Any]) -> str:
    """The SVG text for one query-API trace."""
    rows = _ordered(trace["spans"])
    start = min(span["startTime"] for span in trace["spans"])
    end = max(span["startTime"] + span["duration"] for span in trace["spans"])
    scale = (_WIDTH - _LEFT - 20) / max(end - start, 1)
    height = 60 + _ROW * len(rows)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_WIDTH}" height="{height}" font-family="sans-serif" '
        'font-size="12">',
        f'<rect width="{_WIDTH}" height="{height}" fill="white"/>',
        f'<text x="10" y="22" font-size="14" font-weight="bold">trace {escape(trace["traceID"])} '
        f"({(end - start) / 1000:.1f} ms)</text>",
    ]
    for index, (depth, span) in enumerate(rows):
        y = 40 + index * _ROW
        tags = _tags(span)
        kind = str(tags.get("span.kind", "internal"))
        x = _LEFT + (span["startTime"] - start) * scale
        width = max(span["duration"] * scale, 2)
        detail = ", ".join(f"{_SHORT[key]} {_value(tags[key])}" for key in _TAGS if key in tags)
        out += [
            f'<text x="{10 + depth * 16}" y="{y + 14}" font-weight="bold">{escape(span["operationName"])}</text>',
            f'<text x="{10 + depth * 16}" y="{y + 30}" fill="#555" font-size="10">{escape(detail)}</text>',
            f'<rect x="{x:.1f}" y="{y + 4}" width="{width:.1f}" height="14" rx="2" '
            f'fill="{_COLOURS.get(kind, "#999")}"/>',
            f'<text x="{x:.1f}" y="{y + 32}" fill="#333" font-size="10">{span["duration"] / 1000:.1f} ms</text>',
        ]
        for log in span.get("logs", []):
            fields = {field["key"]: field["value"] for field in log["fields"]}
            lx = _LEFT + (log["timestamp"] - start) * scale
            hop = f"{fields.get('routesvc.from_model', '')} -> {fields.get('routesvc.to_model', '')}"
            label = f"{fields.get('event', '')} {hop}"
            if "routesvc.score" in fields:
                label += f" (score {fields['routesvc.score']:g})"
            # Labels near the right edge are drawn to the left of their marker.
            anchor = "end" if lx > _WIDTH - 300 else "start"
            tx = lx - 8 if anchor == "end" else lx + 8
            out += [
                f'<path d="M{lx:.1f} {y + 1} l5 7 l-5 7 l-5 -7 z" fill="#e45756"/>',
                f'<text x="{tx:.1f}" y="{y + 30}" text-anchor="{anchor}" fill="#e45756" font-size="10">'
                f"{escape(label)}</text>",
            ]
    out.append("</svg>")
    return "\n".join(out)


def main() -> None:
    """Read the query API's JSON on stdin and write the first trace's SVG on stdout."""
    body = json.load(sys.stdin)
    traces = body["data"] if isinstance(body, dict) else body
    sys.stdout.write(render(traces[0]) + "\n")


if __name__ == "__main__":
    main()
