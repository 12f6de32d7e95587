"""Reports in the layout of the paper's Table 1, the accuracy-against-sparsity plot, and the
result files a run publishes (:func:`save_results`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from seap.evaluation.metrics import flat_metrics, metric_for
from seap.io import atomic_write_bytes, atomic_write_text

METHOD_ORDER = ("dense", "wanda-sp", "wanda-sp+logistic", "flap", "flap+logistic", "seap-general", "seap-expert",
                "seap-routed", "seap-budget")


def _order(row: dict[str, Any]) -> tuple[float, int, str]:
    m = row["method"]
    return (row["sparsity"], METHOD_ORDER.index(m) if m in METHOD_ORDER else 99, m)


def table1(results: dict[str, Any]) -> str:
    """Markdown table: sparsity x method rows, task columns and the average (metric x 100)."""
    metric = results.get("metric", "acc")
    tasks = [t["name"] for t in results["tasks"]]
    header = ["Ratio", "Method", *tasks, "Avg", "Realised"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(tasks) + 2)) + "|"]
    for row in sorted(results["rows"], key=_order):
        cells = [f"{row['sparsity'] * 100:.0f}%", row["method"]]
        for task in tasks:
            value = row["tasks"].get(task, {}).get(metric_for(task, metric))
            cells.append("–" if value is None else f"{value * 100:.2f}")
        cells.append(f"**{row['average']['table'] * 100:.2f}**")
        cells.append(f"{row['realised_sparsity'] * 100:.1f}%")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown_report(results: dict[str, Any]) -> str:
    cfg = results["config"]
    parts = [
        f"# SEAP evaluation: {cfg['model']}",
        "",
        f"Metric: `{results.get('metric', 'acc')}` (x100); {results.get('num_fewshot', 0)}-shot; "
        f"limit {results.get('limit') or 'none'} items per task; lm-eval {results.get('lm_eval_version')}; "
        f"data {str(results.get('data_fingerprint', ''))[:19]}; model {str(results.get('model_fingerprint', ''))[:19]}.",
        "",
        table1(results),
        "Averages of both lm-eval metrics (x100):",
        "",
        "| Ratio | Method | acc | acc_norm |",
        "|---|---|---:|---:|",
        *[f"| {r['sparsity'] * 100:.0f}% | {r['method']} | {r['average'].get('acc', float('nan')) * 100:.2f} | "
          f"{r['average'].get('acc_norm', float('nan')) * 100:.2f} |" for r in sorted(results["rows"], key=_order)],
        "",
    ]
    if results.get("router"):
        r = results["router"]
        parts += ["## Router", "",
                  f"Held-out accuracy {r['heldout_accuracy'] * 100:.1f}% ({r['n_heldout']} prompts, layer "
                  f"{r['feature_layer']} features, threshold {r['threshold']}).", "",
                  "| task | held-out accuracy |", "|---|---:|",
                  *[f"| {t} | {a * 100:.1f}% |" for t, a in r["heldout_accuracy_per_task"].items()], ""]
        for row in results["rows"]:
            if row["method"] == "seap-routed":
                s = row["routing"]
                parts.append(f"Routed at {row['sparsity']:g}: routing accuracy {s['routing_accuracy'] * 100:.1f}%, "
                             f"fallback to general {s['fallback_rate'] * 100:.1f}%, router time "
                             f"{row['router_seconds']:.2f} s = {row['router_overhead'] * 100:.2f}% of evaluation time.")
        parts.append("")
    if results.get("budget"):
        parts += budget_section(results["budget"], results["rows"], results.get("speed"))
    if results.get("perplexity"):
        parts += ["## WikiText-2 perplexity", "", "| model | perplexity | tokens |", "|---|---:|---:|"]
        for name, p in results["perplexity"].items():
            parts.append(f"| {name} | {p['perplexity']:.2f} | {p['tokens_scored']} |")
        first = next(iter(results["perplexity"].values()))
        parts += ["", f"Protocol: context {first['context_length']}, stride {first['stride']}. {first['protocol']}", ""]
    if results.get("speed"):
        parts += speed_section(results["speed"])
    return "\n".join(parts) + "\n"


def budget_section(budget: dict[str, Any], rows: list[dict[str, Any]],
                   speed: dict[str, Any] | None = None) -> list[str]:
    """Each task's expert under the accuracy budget: its sparsity, its selection accuracy against
    the dense model's, its accuracy on the reported items (the ``seap-budget`` row) and, when the
    bench ran, its prefill speed-up over dense."""
    speeds = (speed or {}).get("models", {})
    dense = next((r for r in rows if r["method"] == "dense"), None)
    row = next((r for r in rows if r["method"] == "seap-budget"), None)
    what = (f"at most {budget['max_drop']:g} points" if budget.get("max_drop") is not None
            else f"at most {budget['max_drop_rel']:g} of the margin over chance"
            if budget.get("max_drop_rel") is not None else "by any amount (no accuracy budget)")
    searched = budget.get("search")
    z = next((e["confidence"] for e in budget["tasks"].values() if e.get("confidence")), None)
    confident = f" (the measured drop plus {z:g} standard error{'' if z == 1 else 's'} of it, paired by item)" \
        if z else ""
    where = (f"found by bisection to a step of {searched['step'] * 100:g}% up to {searched['ceiling'] * 100:g}% "
             f"({searched['rounds']} rounds, {searched['probes']} candidates scored besides the run's own sparsities)"
             if searched else "of the grid")
    parts = ["## Accuracy budget", "",
             f"Each task's expert at the largest sparsity {where} whose accuracy on held-out train items "
             f"(selection) drops {what}{confident} below the dense model's there, with every smaller candidate within it "
             f"too (`budget.png`: the curves).", "",
             "| task | sparsity | realised | selection items | dense (sel.) | expert (sel.) | allowed drop | "
             "dense (test) | expert (test) | drop (test) | prefill x dense |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for task, e in budget["tasks"].items():
        sel = e["dense"] if e["chosen"] == 0 else e["curve"].get(f"{e['chosen']:g}", float("nan"))
        key = metric_for(task, budget.get("metric", "acc"))
        test_dense = dense["tasks"].get(task, {}).get(key) if dense else None
        test = row["tasks"].get(task, {}).get(key) if row else None
        drop = f"{(test_dense - test) * 100:.2f}" if test is not None and test_dense is not None else "–"
        allowed = "–" if e.get("allowed_drop") is None else f"{e['allowed_drop'] * 100:.2f}"
        timed = speeds.get(f"seap-budget:{task}")
        at_chosen = (e.get("speed") or {}).get("at_chosen")  # (else the speed target's own timing)
        fast = f"{timed['prefill_speedup']:.2f}" if timed else f"{at_chosen:.2f}" if at_chosen else "–"
        parts.append(f"| {task} | {e['chosen'] * 100:g}% | {e['realised_sparsity'] * 100:.1f}% | "
                     f"{e['selection_items']} | {e['dense'] * 100:.1f} | {sel * 100:.1f} | "
                     f"{allowed} | {'–' if test_dense is None else f'{test_dense * 100:.2f}'} | "
                     f"{'–' if test is None else f'{test * 100:.2f}'} | {drop} | {fast} |")
    general = budget.get("general")
    if general:
        row_g = next((r for r in rows if r["method"] == "seap-budget-general"), None)
        lost = [(dense["tasks"][t][metric_for(t, budget.get("metric", "acc"))]
                 - row_g["tasks"][t][metric_for(t, budget.get("metric", "acc"))]) * 100
                for t in budget["tasks"] if dense and row_g and t in row_g["tasks"]]
        timed = speeds.get("seap-budget-general:general")
        parts += ["", f"General mask under the same budget: {general['chosen'] * 100:g}% "
                  f"(realised {general['realised_sparsity'] * 100:.1f}%, bound by {general['bound_by']})"
                  + (f"; its largest drop on the reported items {max(lost):.2f} points" if lost else "")
                  + (f"; prefill x dense {timed['prefill_speedup']:.2f}" if timed else "") + "."]
    routed = next((r for r in rows if r["method"] == "seap-budget-routed" and r.get("fallback")), None)
    if routed:
        f = routed["fallback"]
        means = {n: sum(c["accuracy"].values()) / len(c["accuracy"]) * 100 for n, c in f["candidates"].items()}
        parts += ["", f"Routed fallback, chosen on tasks no calibration saw ({', '.join(f['held_out_tasks'])}; dense "
                  f"{sum(f['dense'].values()) / len(f['dense']) * 100:.2f}): **{f['chosen']}**, the sparsest that keeps "
                  "every one within the budget; candidates " + ", ".join(
                      f"{n} {m:.2f} at {f['candidates'][n]['realised_sparsity'] * 100:.1f}%" for n, m in means.items())
                  + "."]
    versus = budget.get("versus_uniform")
    if versus:
        parts += ["", f"Against one sparsity for every expert at nearly the same mean (`seap-budget-uniform`: "
                  f"{versus['sparsity'][1] * 100:g}% against the budget's mean "
                  f"{versus['realised_sparsity'][0] * 100:.1f}% realised, {versus['realised_sparsity'][1] * 100:.1f}%), "
                  f"on the same {versus['items']} reported items: budget minus uniform "
                  f"**{versus['difference']:+.2f}** points (95% interval {versus['low']:+.2f} to {versus['high']:+.2f}; "
                  f"McNemar p = {versus['p_mcnemar']:.3g})."]
    if budget.get("min_speedup") is not None:
        engine = (budget.get("speed_setup") or {}).get("runtime", "pytorch")
        where = "in llama.cpp (float16 GGUF, llama-bench prompt processing)" if engine == "llama.cpp" else "in PyTorch"
        parts += ["", f"Speed target: prefill at least {budget['min_speedup']:g}x dense {where} (each candidate shape "
                  "timed against dense in one run). " + "; ".join(
                      f"{t}: reached from {e['speed']['reached_at'] * 100:g}%" if e["speed"]["reached_at"] is not None
                      else f"{t}: not reached on the grid" for t, e in budget["tasks"].items())
                  + ". Where the budget and the target cannot both be met, the budget is kept: "
                  + (", ".join(t for t, e in budget["tasks"].items() if not e["speed"]["met"]) or "none") + "."]
    unresolved = [f"{t} ({e['resolution']:.1f} points on {e['selection_items']} items)"
                  for t, e in budget["tasks"].items()
                  if e.get("allowed_drop") is not None and e["resolution"] > e["allowed_drop"] * 100]
    if unresolved:
        parts += ["", "Selection items too few to resolve the budget (standard error of the accuracy): "
                  + ", ".join(unresolved) + "."]
    return [*parts, ""]


def speed_section(sp: dict[str, Any]) -> list[str]:
    """The speed tables (PyTorch, and llama.cpp when it ran) as markdown lines."""
    parts: list[str] = []
    parts += ["## Speed", "", f"{sp['setup']['prefill']}; {sp['setup']['decode']}; median of "
              f"{sp['setup']['repeats']} on {sp['setup']['device']} ({sp['setup']['torch_threads']} threads).", "",
              "| model | realised | parameters | MiB | prefill tok/s | x dense | decode tok/s | x dense |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, m in sp["models"].items():
        memory = f"{m['params'] / 1e6:.2f}M | {m['bytes'] / 2**20:.1f}" if "bytes" in m else "- | -"
        parts.append(f"| {name} | {m['realised_sparsity'] * 100:.1f}% | {memory} | {m['prefill_tokens_per_s']:.0f} | "
                     f"{m['prefill_speedup']:.2f} | {m['decode_tokens_per_s']:.1f} | {m['decode_speedup']:.2f} |")
    parts.append("")
    engine = sp.get("llama_cpp") or {}
    if engine.get("models"):
        st = engine["setup"]
        parts += [f"In llama.cpp ({st['engine']}, {st['format']}, {st['tool']}: {st['prefill']}, {st['decode']}; "
                  f"mean of {st['repetitions']}, {st['threads']} threads), in the same run:", "",
                  "| model | MiB | prefill tok/s | x dense | decode tok/s | x dense |", "|---|---:|---:|---:|---:|---:|"]
        for name, m in engine["models"].items():
            parts.append(f"| {name} | {m['bytes'] / 2**20:.1f} | {m['prefill_tokens_per_s']:.0f} | "
                         f"{m['prefill_speedup']:.2f} | {m['decode_tokens_per_s']:.1f} | {m['decode_speedup']:.2f} |")
        parts.append("")
    elif engine.get("skipped"):
        parts += [f"llama.cpp: {engine['skipped']}.", ""]
    return parts


def accuracy_plot(results: dict[str, Any], path: str | Path) -> Path:
    """Average accuracy against target sparsity, one line per method (dense at 0)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = next((r for r in results["rows"] if r["method"] == "dense"), None)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    methods = sorted({r["method"] for r in results["rows"]} - {"dense"},
                     key=lambda m: METHOD_ORDER.index(m) if m in METHOD_ORDER else 99)
    for method in methods:
        rows = sorted((r for r in results["rows"] if r["method"] == method), key=lambda r: r["sparsity"])
        xs = [0.0] + [r["sparsity"] * 100 for r in rows] if dense else [r["sparsity"] * 100 for r in rows]
        ys = ([dense["average"]["table"] * 100] if dense else []) + [r["average"]["table"] * 100 for r in rows]
        ax.plot(xs, ys, marker="o", label=method)
    if dense:
        ax.axhline(dense["average"]["table"] * 100, color="gray", linestyle=":", label="dense")
    ax.set_xlabel("target sparsity (%)")
    metric = results.get("metric", "acc")
    ax.set_ylabel("average accuracy, paper's acc/acc_norm mix (%)" if metric == "paper" else f"average {metric} (%)")
    ax.set_title(f"{results['config']['model']}: accuracy vs sparsity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return atomic_write_bytes(path, buffer.getvalue())


RESULT_FILES = ("results.json", "results.md", "accuracy_vs_sparsity.png", "metrics.json", "accuracy.csv")
OPTIONAL_RESULT_FILES = ("budget.png",)  # (with an accuracy budget: the search's curves)


def save_results(results: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write results.json, results.md (Table 1 layout), accuracy_vs_sparsity.png, plus the
    flat metrics.json and accuracy.csv (average accuracy per method and sparsity) for DVC."""
    out = Path(out_dir)
    paths = {"json": out / "results.json", "markdown": out / "results.md", "plot": out / "accuracy_vs_sparsity.png",
             "metrics": out / "metrics.json", "csv": out / "accuracy.csv"}
    atomic_write_text(paths["json"], json.dumps(results, indent=2, default=str) + "\n")
    atomic_write_text(paths["markdown"], markdown_report(results))
    accuracy_plot(results, paths["plot"])
    atomic_write_text(paths["metrics"], json.dumps(flat_metrics(results), indent=2, sort_keys=True) + "\n")
    lines = ["method,sparsity,average,realised_sparsity"]
    for row in sorted(results["rows"], key=lambda r: (r["method"], r["sparsity"])):
        lines.append(f"{row['method']},{row['sparsity'] * 100:g},{row['average']['table'] * 100:.4f},"
                     f"{row['realised_sparsity'] * 100:.4f}")
    atomic_write_text(paths["csv"], "\n".join(lines) + "\n")
    return paths
