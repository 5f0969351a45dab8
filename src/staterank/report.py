"""One report of a run directory: report.md and a self-contained report.html (images embedded).

It shows whatever the directory holds: model info (info.json), the state-rank analysis
(any folder with rank.json and its plots), pruning configurations (folders with pruning.json),
perplexities (eval-*.json, drawn as a bar chart, and against the pruning ratio where a method was run
at several ratios), in-context recall (eval-*.json with a "recall" key), MQAR accuracy (eval-*.json with a
"mqar" key) and the bench table (bench.json). A headline opens it: state size, perplexity, recall and speed.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from matplotlib.figure import Figure

from staterank import layout
from staterank.errors import StaterankError
from staterank.io import atomic_file


class ReportError(StaterankError):
    """A run directory with nothing to report."""


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


def _perplexity_chart(evals: dict[str, dict[str, float]]) -> bytes:
    """Grouped bars: one group per model, one bar per corpus."""
    corpora = sorted({data for scores in evals.values() for data in scores})
    fig = Figure(figsize=(max(6, 1.3 * len(evals)), 3.6), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(corpora))
    for c, data in enumerate(corpora):
        xs = [m + c * width for m in range(len(evals))]
        ax.bar(xs, [scores.get(data, 0) for scores in evals.values()], width, label=data)
    ax.set_xticks([m + width * (len(corpora) - 1) / 2 for m in range(len(evals))], list(evals), rotation=20)
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.set_title("Perplexity before pruning, after pruning and after recovery")
    ax.legend()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def _ratio_points(found: dict, data: str) -> dict[str, list[tuple[float, float]]]:
    """Perplexity on ``data`` against the pruning ratio, per method: [(ratio, ppl)] with the unpruned model at 0."""
    points: dict[str, list[tuple[float, float]]] = {}
    for entry in found["pruning"]:
        report, scores = entry["report"], found["evals"].get(entry["name"], {})
        if data not in scores:
            continue
        line = points.setdefault(report["method"], [])
        original = found["evals"].get(layout.model_name(report.get("model", "")), {})
        if data in original and not any(ratio == 0 for ratio, _ in line):
            line.append((0.0, original[data]))
        line.append((float(report["ratio"]), scores[data]))
    return {method: sorted(line) for method, line in points.items() if len({r for r, _ in line if r > 0}) >= 2}


def _ratio_chart(curves: dict[str, dict[str, list[tuple[float, float]]]]) -> bytes:
    """One panel per corpus: perplexity against the pruning ratio, one line per method."""
    fig = Figure(figsize=(4.2 * len(curves), 3.6), layout="constrained")
    for k, (data, lines) in enumerate(curves.items()):
        ax = fig.add_subplot(1, len(curves), k + 1)
        for method, line in lines.items():
            ax.plot([r for r, _ in line], [p for _, p in line], marker="o", label=method)
        ax.set_xlabel("pruning ratio")
        ax.set_ylabel("perplexity")
        ax.set_yscale("log")
        ax.set_title(data)
        ax.legend()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def _recall_rows(recalls: dict[str, dict]) -> tuple[list[str], list[list[str]]]:
    first = next(iter(recalls.values()))
    header = ["model"]
    header += [f"copy {first['copy']['length']} tokens at {d}" for d in first["copy"]["distance"]]
    header += [f"lookup of {n} pairs" for n in first["kv"]["items"]]
    rows = [
        [model, *(f"{a:.3f}" for a in recall["copy"]["accuracy"]), *(f"{a:.3f}" for a in recall["kv"]["accuracy"])]
        for model, recall in recalls.items()
    ]
    return header, rows


def collect(run_dir: Path) -> dict:
    """Everything reportable in a run directory (raises ReportError when there is nothing)."""
    found: dict = {"info": None, "analyses": [], "pruning": [], "evals": {}, "recall": {}, "mqar": {}, "bench": None}
    if (run_dir / layout.INFO).is_file():
        found["info"] = _read(run_dir / layout.INFO)
    for rank in sorted(run_dir.rglob(layout.RANK)):
        images = sorted(rank.parent.glob("*.png"))
        found["analyses"].append({"dir": rank.parent, "rank": _read(rank), "images": images})
    for pruning in sorted(run_dir.rglob(layout.PRUNING)):
        found["pruning"].append({"name": layout.model_name(pruning.parent), "report": _read(pruning)})
    for path in sorted(run_dir.glob(layout.EVAL_GLOB)):
        result = _read(path)  # staterank evaluate's JSON names the model and the corpus itself
        model = layout.model_name(result["model"])
        if "ppl" in result:
            found["evals"].setdefault(model, {})[result["data"]] = result["ppl"]
        if "recall" in result:
            found["recall"][model] = result["recall"]
        if "mqar" in result:
            found["mqar"][model] = result["mqar"]
    if (run_dir / layout.BENCH).is_file():
        found["bench"] = _read(run_dir / layout.BENCH)
    if not any(found[key] for key in ("info", "analyses", "pruning", "evals", "recall", "mqar", "bench")):
        raise ReportError(
            f"{run_dir}: nothing to report (no info.json, rank.json, pruning.json, eval-*.json or bench.json)"
        )
    return found


def headline(found: dict) -> list[str]:
    """A few lines before the details: state size, perplexity, MQAR recall and speed, original against the rest."""
    lines = []
    for entry in found["pruning"]:
        r = entry["report"]
        before, after = r["state_bytes_before"], r["state_bytes_after"]
        lines.append(f"State: {entry['name']} holds {after:,} bytes per sequence against {before:,} "
                     f"({before / after:.2f}x smaller).")  # fmt: skip
    # the original model: the first one that no pruning in the run directory made (nor its recovery)
    derived = {entry["name"] for entry in found["pruning"]}
    derived |= {f"{name}-lora" for name in derived}

    def original_first(results: dict) -> list:
        return sorted(results.items(), key=lambda item: item[0] in derived)

    if found["evals"]:
        (original, scores), *others = original_first(found["evals"])
        data = next(iter(scores))
        changes = ", ".join(f"{m} {s[data]:.2f}" for m, s in others if data in s)
        lines.append(f"Perplexity on {data}: {original} {scores[data]:.2f}" + (f"; {changes}." if changes else "."))
    if found["mqar"]:
        (original, first), *others = original_first(found["mqar"])
        changes = ", ".join(f"{m} {r['accuracy']:.3f}" for m, r in others)
        lines.append(f"MQAR recall ({first['pairs']} pairs, {first['seq_len']} tokens): {original} "
                     f"{first['accuracy']:.3f}" + (f"; {changes}." if changes else "."))  # fmt: skip
    if found["bench"] and len(found["bench"]["models"]) > 1:
        bench = found["bench"]
        graphed = bench["models"][0].get("decode_graph_ms_per_token") is not None
        key = "decode_graph_ms_per_token" if graphed else "decode_ms_per_token"
        batch = list(bench["models"][0][key])[-1]
        first = bench["models"][0]
        for row in bench["models"][1:]:
            lines.append(
                f"Speed against {layout.model_name(first['name'])}: {layout.model_name(row['name'])} prefills "
                f"{row['prefill_tokens_per_s'] / first['prefill_tokens_per_s']:.2f}x as fast and decodes "
                f"{first[key][batch] / row[key][batch]:.2f}x as fast at batch {batch} "
                f"({'CUDA graph' if graphed else 'eager'}, {bench['device']})."
            )
    return lines


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Write RUN_DIR/report.md (images referenced beside it) and RUN_DIR/report.html (images embedded)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: not a directory")
    found = collect(run_dir)
    sections: list[tuple[str, list[tuple[str, object]]]] = []  # (title, [(kind, payload)])

    if found["info"]:
        info = found["info"]
        rows = [
            [str(layer[k]) for k in ("layer", "num_k_heads", "num_v_heads", "head_k_dim", "head_v_dim")]
            for layer in info["layers"]
        ]
        sections.append(
            (
                "Model",
                [
                    (
                        "text",
                        f"{info['path']}: {info['family']}, {info['params']:,} parameters, "
                        f"{info['state_bytes_per_seq']:,} state bytes per sequence",
                    ),
                    ("table", (["layer", "key heads", "value heads", "d_k", "d_v"], rows)),
                ],
            )
        )
    for analysis in found["analyses"]:
        strat = analysis["rank"]["stratification"]
        rho = analysis["rank"]["stability"].get("across_samples_spearman")
        summary = (
            f"{strat['low']} low-rank and {strat['high']} high-rank heads (gap {strat['gap']:.3f} of capacity), "
            f"Spearman correlation of head ranks across samples {'n/a' if rho is None else f'{rho:.3f}'}"
        )
        items: list[tuple[str, object]] = [("text", summary)]
        items += [("image", image) for image in analysis["images"]]
        sections.append((f"State ranks ({analysis['dir'].relative_to(run_dir)})", items))
    if found["pruning"]:
        rows = []
        for entry in found["pruning"]:
            report = entry["report"]
            change = (
                f"d_k {report['head_k_dim_before']} -> {report['head_k_dim_after']}"
                if "kept" in report
                else f"{sum(len(h) for h in report['removed'].values())} heads removed"
            )
            rows.append(
                [
                    entry["name"],
                    report["method"],
                    str(report["ratio"]),
                    change,
                    f"{report['state_bytes_before']:,} -> {report['state_bytes_after']:,}",
                ]
            )
        sections.append(("Pruning", [("table", (["model", "method", "ratio", "change", "state bytes"], rows))]))
    if found["evals"]:
        corpora = sorted({d for scores in found["evals"].values() for d in scores})
        rows = [
            [model] + [f"{scores[d]:.2f}" if d in scores else "" for d in corpora]
            for model, scores in found["evals"].items()
        ]
        chart = run_dir / layout.PERPLEXITY_CHART
        with atomic_file(chart, "wb") as f:
            f.write(_perplexity_chart(found["evals"]))
        items: list[tuple[str, object]] = [("table", (["model", *corpora], rows)), ("image", chart)]
        curves = {data: lines for data in corpora if (lines := _ratio_points(found, data))}
        if curves:
            chart = run_dir / layout.RATIO_CHART
            with atomic_file(chart, "wb") as f:
                f.write(_ratio_chart(curves))
            items.append(("image", chart))
        sections.append(("Perplexity", items))
    if found["recall"]:
        header, rows = _recall_rows(found["recall"])
        sections.append(
            ("In-context recall (accuracy; chance is about 1 / vocabulary)", [("table", (header, rows))])
        )
    if found["mqar"]:
        rows = [
            [model, str(m["pairs"]), str(m["seq_len"]), f"{m['examples']:,}", f"{m['accuracy']:.4f}"]
            for model, m in found["mqar"].items()
        ]
        chance = min(1 / m["num_values"] for m in found["mqar"].values())
        sections.append(
            (
                f"Multi-query associative recall (MQAR accuracy; chance is about {chance:.3f})",
                [("table", (["model", "pairs", "tokens", "examples", "accuracy"], rows))],
            )
        )
    if found["bench"]:
        bench = found["bench"]
        sizes = list(bench["models"][0]["decode_ms_per_token"])
        graphed = bench["models"][0].get("decode_graph_ms_per_token") is not None
        columns = ["model", "prefill tok/s"]
        for b in sizes:
            columns += [f"eager ms/token b={b}"] + ([f"graph ms/token b={b}"] if graphed else [])
        rows = []
        for row in bench["models"]:
            cells = [row["name"], f"{row['prefill_tokens_per_s']:,.0f}"]
            for b in sizes:
                cells.append(f"{row['decode_ms_per_token'][b]:.2f}")
                if graphed:
                    cells.append(f"{row['decode_graph_ms_per_token'][b]:.2f}")
            rows.append([*cells, f"{row['state_bytes_per_seq']:,}"])
        sections.append(
            (
                f"Speed ({bench['device']}, {bench['dtype']}, prefill {bench['batch_size']} x {bench['seq_len']})",
                [
                    (
                        "table",
                        ([*columns, "state bytes/seq"], rows),
                    ),
                ],
            )
        )

    lines = headline(found)
    if lines:
        sections.insert(0, ("Headline", [("text", line) for line in lines]))
    markdown = [f"# staterank report: {run_dir.name}", ""]
    page = [f"<h1>staterank report: {html.escape(run_dir.name)}</h1>"]
    for title, items in sections:
        markdown += [f"## {title}", ""]
        page.append(f"<h2>{html.escape(title)}</h2>")
        for kind, payload in items:
            if kind == "text":
                markdown += [str(payload), ""]
                page.append(f"<p>{html.escape(str(payload))}</p>")
            elif kind == "table":
                header, rows = payload
                markdown += [_markdown_table(header, rows), ""]
                page.append(_html_table(header, rows))
            else:
                image = Path(payload)
                markdown += [f"![{image.stem}]({image.relative_to(run_dir).as_posix()})", ""]
                data = base64.b64encode(image.read_bytes()).decode()
                page.append(f'<img alt="{html.escape(image.stem)}" src="data:image/png;base64,{data}">')
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "th{background:#f4f4f4}img{max-width:100%;display:block;margin:1em 0}"
    )
    document = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>staterank report</title>"
        f"<style>{style}</style></head><body>{''.join(page)}</body></html>"
    )
    md_path, html_path = run_dir / layout.REPORT_MARKDOWN, run_dir / layout.REPORT_HTML
    with atomic_file(md_path) as f:
        f.write("\n".join(markdown))
    with atomic_file(html_path) as f:
        f.write(document)
    return md_path, html_path
