"""The study's written report: the issue's targets, ``study.json`` and ``study.md`` (the
tables, a function of the JSON alone) and ``study-retention.png`` (margin retention against
sparsity with 95% bands), all under ``<out>/results``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from seap.io import atomic_write_json, atomic_write_text
from seap.run.methods import DENSE, row_key
from seap.run.study.analysis import mean_or_none
from seap.run.study.design import (BIAS_COMPENSATION, CONTROL, NO_COMPENSATION, SAME_SCHEDULE, SELECTION_METHODS,
                                   STUDY_METHODS)


def targets(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with the figure reached and whether it is met."""
    rows = {(r["run"], r["row"]): r for r in record["rows"]}
    dense = next((r for r in record["rows"] if r["row"] == DENSE), None)
    out = []
    for comp in (c for c in record["compensations"] if c != CONTROL):  # the control repeats the expert rows
        def get(method: str, sparsity: float) -> Mapping[str, Any] | None:
            return rows.get((comp, row_key(method, sparsity)))

        expert50, expert20 = get("seap-expert", 0.5), get("seap-expert", 0.2)
        if expert50 and expert50.get("starter") is not None:
            out.append({"compensation": comp, "target": "SEAP experts at 50%: starter average >= 65",
                        "value": expert50["starter"] * 100, "met": expert50["starter"] >= 0.65})
        if expert20 and dense:
            gap = (dense["starter"] - expert20["starter"]) * 100
            out.append({"compensation": comp, "target": "SEAP experts at 20%: within 2 points of dense (starter)",
                        "value": -gap, "met": gap <= 2})
            if "piqa" in expert20["tasks"]:
                gap = (dense["tasks"]["piqa"]["accuracy"] - expert20["tasks"]["piqa"]["accuracy"]) * 100
                out.append({"compensation": comp, "target": "SEAP experts at 20%: within 2 points of dense (PIQA)",
                            "value": -gap, "met": gap <= 2})
        ppl = (record.get("perplexity") or {}).get(comp) or {}
        general50 = ppl.get(row_key("seap-general", 0.5))
        if general50 and ppl.get(DENSE):
            ratio = general50["perplexity"] / ppl[DENSE]["perplexity"]
            out.append({"compensation": comp, "target": "general mask at 50%: WikiText-2 perplexity <= 3x dense",
                        "value": ratio, "met": ratio <= 3})
        for sparsity in record["sparsities"]:
            for baseline in SAME_SCHEDULE:
                found = [p for p in record["paired"] if p["run"] == comp and p["sparsity"] == sparsity
                         and p["baseline"] == baseline]
                if found:
                    p = found[0]
                    out.append({"compensation": comp, "target": f"expert ahead of {baseline} at {sparsity:g} "
                                                                "(paired 95% interval above zero)",
                                "value": p["difference"] * 100, "low": p["low"] * 100, "high": p["high"] * 100,
                                "met": p["verdict"] == "ahead"})
    return out


def write_study(record: dict[str, Any], out: Path) -> None:
    """``study.json``, ``study.md`` and ``study-retention.png`` under ``out/results``."""
    folder = out / "results"
    record = {**record, "targets": targets(record)}
    atomic_write_json(folder / "study.json", record)
    atomic_write_text(folder / "study.md", study_markdown(record))
    plot_retention(record, folder / "study-retention.png")


def _pct(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value * 100:.{digits}f}"


def _row_order(row: str) -> tuple[float, int, str]:
    """Dense first, then by sparsity and STUDY_METHODS' order (the order of a table does not depend
    on which runs a ledger held)."""
    if row == DENSE:
        return (-1.0, -1, "")
    method, _, sparsity = row.rpartition("@")
    rank = STUDY_METHODS.index(method) if method in STUDY_METHODS else len(STUDY_METHODS)
    return (float(sparsity or 0), rank, row)


def study_markdown(record: Mapping[str, Any]) -> str:
    """The study's tables in Markdown."""
    lines = [f"Model `{record['model']}`; tasks {', '.join(record['tasks'])}; "
             f"{record['samples']} calibration records per task; items per task: "
             f"{'all' if record['limit'] is None else record['limit']}; metric `{record['metric']}`; "
             f"run time {record.get('measured_seconds', record['seconds']) / 60:.0f} min of measuring "
             f"(this pass {record['seconds'] / 60:.0f} min); phases done: {record.get('phases_done', 'all')}.", ""]
    ledger = record.get("ledger")
    if ledger:
        lines[0] += (f" Runs: {ledger['runs']}, {ledger['reused']} of them read from the ledger; measured with "
                     f"{', '.join(ledger['versions'])}.")
    head = record["headline_tasks"]
    lines.append(f"Headline average over: {', '.join(head)}.")
    if record["excluded_tasks"]:
        lines.append("Left out of the headline (dense within 5 points of chance): " + ", ".join(
            f"{t} (dense {v['dense'] * 100:.1f}, chance {v['chance'] * 100:.1f})"
            for t, v in record["excluded_tasks"].items()) + ".")
    sel = record["selection"]
    lines += ["", "### Settings chosen on held-out train items", "",
              f"Each task's train split cut in two (seed); masks calibrated on one part, scored on the other "
              f"({sel['items_per_task']} items per task at most); mean over "
              f"{', '.join(SELECTION_METHODS)} at the selection sparsities.", "",
              "| setting | mean accuracy | " + " | ".join(columns := sorted(
                  next(iter(sel["scores"].values()))["rows"], key=_row_order)) + " |",
              "|---|---:|" + "---:|" * len(columns)]
    for name, s in sorted(sel["scores"].items(), key=lambda kv: -kv[1]["mean"]):  # best first
        mark = " **(chosen)**" if name == sel["chosen"] else ""
        lines.append(f"| {s['label']}{mark} | {_pct(s['mean'], 2)} | " +
                     " | ".join(_pct(s["rows"].get(c)) for c in columns) + " |")
    if sel.get("control"):
        lines += ["", "Control on the same items: SEAP expert minus each same-schedule baseline, the baselines "
                  "refitted on the pooled corpora (chosen setting) or on each task's own corpus (per-task):", "",
                  "| baselines refitted | sparsity | baseline | expert | baseline | difference [95% CI] | McNemar p | verdict |",
                  "|---|---:|---|---:|---:|---|---:|---|"]
        for c in sel["control"]:
            lines.append(f"| {c['baselines_refit']} | {c['sparsity']:g} | {c['baseline']} | {_pct(c['expert'])} | "
                         f"{_pct(c['baseline_accuracy'])} | {c['difference'] * 100:+.1f} [{c['low'] * 100:+.1f}, "
                         f"{c['high'] * 100:+.1f}] | {c['p_mcnemar']:.3g} | {c['verdict']} |")
    tasks = list(next(iter(record["rows"]))["tasks"]) if record["rows"] else []
    for comp in record["compensations"]:
        lines += ["", f"### Rows with compensation: {comp}", "",
                  "| row | headline [95% CI] | " + " | ".join(tasks) + " | margin kept | KL | realised |",
                  "|---|---|" + "---:|" * len(tasks) + "---:|---:|---:|"]
        for r in record["rows"]:
            if r["run"] != comp and r["row"] != DENSE:
                continue
            if r["row"] == DENSE and comp != record["compensations"][0]:
                continue
            lo, hi = r["headline_ci95"]
            kl = (r.get("kl") or {}).get("mean")
            cells = [_pct(r["tasks"][t]["accuracy"]) if t in r["tasks"] else "-" for t in tasks]
            lines.append(f"| {r['row']} | {_pct(r['headline'])} [{_pct(lo)}, {_pct(hi)}] | {' | '.join(cells)} | "
                         f"{_pct(r['retention'].get('margin_retention'))} | {'-' if kl is None else f'{kl:.3f}'} | "
                         f"{_pct(r.get('realised'))} |")
    lines += ["", "### SEAP expert minus each baseline, same items (paired bootstrap 95% CI, McNemar p)", "",
              "| compensation | sparsity | baseline | difference [95% CI] | McNemar p | verdict |",
              "|---|---:|---|---|---:|---|"]
    for p in record["paired"]:
        lines.append(f"| {p['run']} | {p['sparsity']:g} | {p['baseline']} | {p['difference'] * 100:+.1f} "
                     f"[{p['low'] * 100:+.1f}, {p['high'] * 100:+.1f}] | {p['p_mcnemar']:.3g} | {p['verdict']} |")
    ppl = record.get("perplexity") or {}
    if any(ppl.values()):
        lines += ["", "### WikiText-2 perplexity (dense and each general mask)", "", "| compensation | row | perplexity |",
                  "|---|---|---:|"]
        order = list(record.get("compensations", []))
        for comp in sorted(ppl, key=lambda c: order.index(c) if c in order else len(order)):
            for row, e in sorted((ppl[comp] or {}).items(), key=lambda kv: _row_order(kv[0])):
                lines.append(f"| {comp} | {row} | {e['perplexity']:.1f} |")
    if record.get("calibration_sizes"):
        lines += ["", "### Calibration size (SEAP expert)", "", "| run | row | headline [95% CI] |", "|---|---|---|"]
        for r in record["calibration_sizes"]:
            if r["row"] == DENSE:
                continue
            lo, hi = r["headline_ci95"]
            lines.append(f"| {r['run']} | {r['row']} | {_pct(r['headline'])} [{_pct(lo)}, {_pct(hi)}] |")
    lines += ["", "### Targets", "", "| compensation | target | reached | met |", "|---|---|---:|---|"]
    for t in record.get("targets", []):
        value = f"{t['value']:.2f}" + (f" [{t['low']:+.1f}, {t['high']:+.1f}]" if "low" in t else "")
        lines.append(f"| {t['compensation']} | {t['target']} | {value} | {'met' if t['met'] else '**missed**'} |")
    return "\n".join(lines) + "\n"


def plot_retention(record: Mapping[str, Any], path: Path) -> None:
    """Margin retention of the headline average against sparsity, per method and compensation,
    with the 95% band of the headline accuracy mapped through the same retention."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    comps = record["compensations"]
    dense = next((r for r in record["rows"] if r["row"] == DENSE), None)
    if dense is None:
        return
    chosen = record.get("chosen", {})
    titles = {NO_COMPENSATION.name: "no compensation", BIAS_COMPENSATION.name: BIAS_COMPENSATION.label,
              CONTROL: "chosen refit, baselines refitted per task (control)"}
    if chosen.get("name"):
        titles[chosen["name"]] = f"{chosen.get('label', chosen['name'])} (chosen)"
    chance = mean_or_none([dense["tasks"][t]["chance"] or 0 for t in record["headline_tasks"]]) or 0
    span = max(dense["headline"] - chance, 1e-9)
    columns = min(len(comps), 2)
    grid_rows = -(-len(comps) // columns)
    fig, axes = plt.subplots(grid_rows, columns, figsize=(6.5 * columns, 4.2 * grid_rows), sharey=True, squeeze=False)
    for ax, comp in zip(axes.flat, comps):
        for colour, method in enumerate(STUDY_METHODS):  # one colour per method in every panel
            pts = sorted((r["sparsity"], r) for r in record["rows"] if r["run"] == comp and r["method"] == method)
            if not pts:
                continue
            xs = [0.0] + [s for s, _ in pts]
            ys = [1.0] + [(r["headline"] - chance) / span for _, r in pts]
            lo = [1.0] + [(r["headline_ci95"][0] - chance) / span for _, r in pts]
            hi = [1.0] + [(r["headline_ci95"][1] - chance) / span for _, r in pts]
            routed = method == "seap-routed"  # equals the expert wherever the router is right: drawn over it, dashed
            ax.plot(xs, ys, marker="" if routed else "o", ls="--" if routed else "-", lw=1 if routed else 1.5,
                    color=f"C{colour}", label=method)
            if not routed:
                ax.fill_between(xs, lo, hi, alpha=0.12, color=f"C{colour}")
        ax.set_title(titles.get(comp, comp), fontsize=10)
        ax.set_xlabel("sparsity")
        ax.axhline(0, color="grey", lw=0.5)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(comps):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("margin over chance kept (dense = 1)")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


__all__ = ["plot_retention", "study_markdown", "targets", "write_study"]
