"""Results beside the published numbers: rows for the JSON output and a markdown table."""

from __future__ import annotations

from gpt2serve.eval.published import PUBLISHED, TASK_METRICS


def comparison_rows(results: dict[str, dict], size: str) -> list[dict]:
    """One row per (task, headline metric): ours, published, difference (absolute and %)."""
    rows = []
    for task, res in results.items():
        for metric, higher_better in TASK_METRICS[task]:
            ours = res["metrics"][metric]
            pub = PUBLISHED.get(size, {}).get((task, metric))
            row = {"task": task, "metric": metric, "ours": ours, "published": pub, "diff": None, "diff_pct": None,
                   "higher_is_better": higher_better, "limit": res.get("limit")}
            if pub is not None:
                row["diff"] = ours - pub
                row["diff_pct"] = 100.0 * (ours - pub) / pub
            rows.append(row)
    return rows


def _fmt(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def markdown_table(rows: list[dict], size: str) -> str:
    lines = [
        f"| task | metric | ours | published ({size}) | difference | difference % |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        digits = 3 if r["metric"] in ("bpb", "bpc") else 2
        note = "" if r.get("limit") is None else f" (first {r['limit']})"
        diff = "–" if r["diff"] is None else f"{r['diff']:+.{digits}f}"
        pct = "–" if r["diff_pct"] is None else f"{r['diff_pct']:+.2f}%"
        lines.append(f"| {r['task']}{note} | {r['metric']} | {_fmt(r['ours'], digits)} | "
                     f"{_fmt(r['published'], digits)} | {diff} | {pct} |")
    return "\n".join(lines)
