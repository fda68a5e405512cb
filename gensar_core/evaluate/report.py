"""The evaluation report of one run: report.md, metrics.json and tradeoff.png.

Written under `<warehouse>/reports/<name>/` in one atomic swap (a failed write leaves the previous
report whole). `results` is what `run_evaluate` builds:

    {"methods": {method: {protocol: {task: metrics | None}}},
     "descriptions": {method: str}, "info": {method: dict}, "meta": {...},
     "paired": {method: {task: {"against", "diff", "low", "high", "n"}}},   (vs the best baseline)
     "paired_headline": {...the same, vs the headline model `gensar`},
     "seed_groups": {model: [rows]}, "seed_summary": {model: {protocol: {task: {metric: stats}}}}}

(the last two only when `evaluate.seeds` retrains some models at more seeds).

The register step, which runs after evaluate, later puts its gate decision above the report's
title (`write_gate_note`).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from gensar_core import tracking
from gensar_core.config import PipelineConfig
from gensar_core.evaluate.metrics import metric_names, paired_bootstrap
from gensar_core.evaluate.protocols import PROTOCOL_LABELS, PROTOCOLS, TASKS
from gensar_core.storage import Warehouse, atomic_dir, write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)

TASK_LABELS = {"rec": "Recommendation", "search": "Search"}
TASK_SHORT = {"rec": "Rec", "search": "Search"}
FILES = ("report.md", "metrics.json", "tradeoff.png")


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


# ---------------------------------------------------------------- models trained at several seeds
def seed_row(name: str, seed: int) -> str:
    """The report row of model `name` retrained at train seed `seed` (`evaluate.seeds`)."""
    return f"{name}@seed{seed}"


def seed_groups(seeds: dict[str, list[int]], rows: Sequence[str]) -> dict[str, list[str]]:
    """{model: its rows in the report, its own seed first} for each model of `evaluate.seeds`
    with at least two rows."""
    groups = {}
    for name, extra in seeds.items():
        members = [r for r in [name, *(seed_row(name, s) for s in dict.fromkeys(extra))] if r in rows]
        if len(members) >= 2:
            groups[name] = members
    return groups


def seed_summary(methods: dict, groups: dict[str, list[str]]) -> dict:
    """{model: {protocol: {task: {metric: {'mean', 'sd', 'n'}}}}} over each group's rows; sd is
    the sample standard deviation (n - 1), None for a task the model does not handle."""
    out: dict = {}
    for name, members in groups.items():
        by_protocol = out.setdefault(name, {})
        for protocol in methods[members[0]]:
            for task in TASKS:
                runs = [(methods[m].get(protocol) or {}).get(task) for m in members]
                if any(r is None for r in runs):
                    by_protocol.setdefault(protocol, {})[task] = None
                    continue
                stats = {}
                for metric, value in runs[0].items():
                    if metric in ("n", "seconds") or not isinstance(value, (int, float)):
                        continue
                    values = np.array([r[metric] for r in runs], dtype=np.float64)
                    stats[metric] = {"mean": float(values.mean()), "sd": float(values.std(ddof=1)), "n": len(values)}
                by_protocol.setdefault(protocol, {})[task] = stats
    return out


def seed_table(results: dict, protocol: str, k: int = 10) -> str:
    """One row per model of `seed_summary`: mean ± sd of HR@k and NDCG@k per task."""
    names = [f"HR@{k}", f"NDCG@{k}"]
    header = ["Model", "seeds"] + [f"{TASK_SHORT[t]} {m}" for t in TASKS for m in names]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, by_protocol in results.get("seed_summary", {}).items():
        cells = [name, str(len(results["seed_groups"][name]))]
        for task in TASKS:
            stats = (by_protocol.get(protocol) or {}).get(task)
            cells += [f"{stats[m]['mean']:.4f} ± {stats[m]['sd']:.4f}" if stats and m in stats else "n/a"
                      for m in names]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_against(per_case: dict, reference: dict, skip: Sequence[str] = (), protocol: str = "full",
                   seed: int = 0) -> dict:
    """Each method (but `skip` and the reference itself) against `reference[task]`, case by case:
    the mean difference of per-case NDCG@10 and its 95% bootstrap interval
    (metrics.paired_bootstrap). {method: {task: {against, diff, low, high, n}}}."""
    out: dict = {}
    for task, ref in reference.items():
        if (protocol, task) not in per_case.get(ref, {}):
            continue
        for method, scores in per_case.items():
            if method == ref or method in skip or (protocol, task) not in scores:
                continue
            stats = paired_bootstrap(scores[(protocol, task)], per_case[ref][(protocol, task)], seed=seed)
            out.setdefault(method, {})[task] = {"against": ref, **stats}
    return out


def paired_against_best(methods: dict, per_case: dict, baselines: Sequence[str], protocol: str = "full",
                        metric: str = "NDCG@10", seed: int = 0) -> dict:
    """Each method that is not a baseline against the best baseline of each task (by `metric` on
    `protocol`): `paired_against` with that baseline as the reference."""
    best = {}
    for task in TASKS:
        scored = [b for b in baselines if (methods[b].get(protocol) or {}).get(task)]
        if scored:
            best[task] = max(scored, key=lambda b: methods[b][protocol][task][metric])
    return paired_against(per_case, best, skip=baselines, protocol=protocol, seed=seed)


def paired_table(paired: dict, against: str = "the best baseline") -> str:
    lines = ["| Method | " + " | ".join(f"{TASK_SHORT[t]} NDCG@10 minus {against} [95% interval]"
                                       for t in TASKS) + " |",
             "|---|" + "---|" * len(TASKS)]
    for method, by_task in paired.items():
        cells = []
        for task in TASKS:
            p = by_task.get(task)
            cells.append("n/a" if p is None else
                         f"{p['diff']:+.4f} [{p['low']:+.4f}, {p['high']:+.4f}] vs {p['against']}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_table(results: dict, protocol: str, ks: Sequence[int] = (1, 5, 10)) -> str:
    """One row per method; HR/NDCG columns for recommendation, then for search."""
    names = metric_names(ks)
    header = ["Method"] + [f"{TASK_SHORT[t]} {m}" for t in TASKS for m in names]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, by_protocol in results["methods"].items():
        cells = [method]
        for task in TASKS:
            metrics = (by_protocol.get(protocol) or {}).get(task)
            cells += [_fmt(metrics.get(m) if metrics else None) for m in names]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_report(results: dict) -> str:
    meta = results.get("meta", {})
    ks = meta.get("ks", (1, 5, 10))
    protocols = [p for p in PROTOCOLS if p in meta.get("protocols", PROTOCOLS)]
    cases = meta.get("cases", {})
    out = [f"# Evaluation report: {meta.get('name', '')}", ""]
    out.append(f"Split **{meta.get('split', '?')}** of `{meta.get('warehouse', '')}`; "
               f"{meta.get('items', '?')} items; cases: "
               + ", ".join(f"{TASK_LABELS[t].lower()} {cases.get(t, '?')}" for t in TASKS)
               + f"; seed {meta.get('seed', '?')}; config {meta.get('config', '?')}.")
    out.append("")
    out.append("**History exclusion.** In full-catalogue ranking every item is a candidate except the "
               "items of the user's earlier splits (train, plus valid when evaluating test), which are "
               "removed from the ranking; a target among them counts as a miss.")
    out.append("")
    for protocol in protocols:
        title = PROTOCOL_LABELS[protocol]
        if protocol == "sampled":
            title = title.replace("100", str(meta.get("num_candidates", 100)))
        out += [f"## {title}", ""]
        if protocol == "sampled":
            n = meta.get("num_candidates", 100) - 1
            out += [f"The paper's protocol: recommendation cases rank the "
                    f"target among {n} negatives sampled in proportion to train popularity (never a history "
                    f"item); search cases among the {n} items BM25 ranks highest for the query (hard "
                    f"negatives). Re-ranking a short list, not retrieval, so not comparable with the full-ranking "
                    f"numbers above (for recommendation it gives several times higher ones).", ""]
        out += [markdown_table(results, protocol, ks), ""]
        if protocol == "full" and results.get("paired"):
            out += ["Paired with the best baseline of each task on the same cases: the mean difference "
                    "of per-case NDCG@10 and its 95% interval over 2,000 bootstrap draws of the cases. An "
                    "interval that holds 0 is a difference the choice of cases alone can explain.", "",
                    paired_table(results["paired"]), ""]
        if protocol == "full" and results.get("paired_headline"):
            out += ["Each other generative model paired the same way with the headline model (`gensar`): "
                    "whether a variant's difference from it is more than the choice of cases.", "",
                    paired_table(results["paired_headline"], "gensar"), ""]
        if results.get("seed_summary"):
            k = 10 if 10 in ks else max(ks)
            out += ["Models trained at several seeds (`evaluate.seeds`; rows `<model>@seed<S>` above): "
                    "mean ± sample standard deviation over the seeds, the model's own row included.", "",
                    seed_table(results, protocol, k), ""]
    out += ["## Methods", ""]
    for method, text in results.get("descriptions", {}).items():
        info = results.get("info", {}).get(method) or {}
        extra = "; ".join(f"{k}: {v}" for k, v in info.items() if not isinstance(v, dict))
        out.append(f"- **{method}**: {text}" + (f" ({extra})" if extra else ""))
    out += ["", "n/a: the method does not handle that task. Trade-off plot: `tradeoff.png` "
            "(NDCG@10, full-catalogue ranking).", ""]
    return "\n".join(out)


def tradeoff_points(results: dict, protocol: str = "full", metric: str = "NDCG@10") -> dict[str, tuple]:
    """{label: (rec, search, rec sd, search sd)} to plot: one point per method, except that a
    model trained at several seeds is one point at its mean (sd 0 for the others; a task the
    method does not handle is None)."""
    grouped = {m for members in results.get("seed_groups", {}).values() for m in members}
    points = {}
    for method, by_protocol in results["methods"].items():
        if method not in grouped:
            by_task = by_protocol.get(protocol) or {}
            points[method] = tuple((by_task.get(t) or {}).get(metric) for t in TASKS) + (0.0, 0.0)
    for name, by_protocol in results.get("seed_summary", {}).items():
        stats = [((by_protocol.get(protocol) or {}).get(t) or {}).get(metric) for t in TASKS]
        label = f"{name} ({len(results['seed_groups'][name])} seeds)"
        points[label] = tuple(s and s["mean"] for s in stats) + tuple(s["sd"] if s else 0.0 for s in stats)
    return points


def plot_tradeoff(results: dict, path: Path, protocol: str = "full", metric: str = "NDCG@10") -> Path:
    """Search quality (y) against recommendation quality (x), one labelled point per method (a
    model trained at several seeds: its mean, with ± sd bars)."""
    # deferred: the plot is the report's last step, and matplotlib must be told its headless
    # backend before pyplot is imported
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    points: dict[tuple, list] = {}  # methods at the same spot share one point and one label
    for method, (x, y, x_sd, y_sd) in tradeoff_points(results, protocol, metric).items():
        if x is None and y is None:
            continue
        # a method without one task sits on that axis, hollow
        hollow = x is None or y is None
        points.setdefault((round(x or 0.0, 4), round(y or 0.0, 4), hollow, x_sd, y_sd), []).append(method)
    xs, ys = [k[0] for k in points] or [0.0], [k[1] for k in points] or [0.0]
    span_x, span_y = max(xs + [1e-3]), max(ys + [1e-3])
    placed: list[tuple] = []
    offsets = [(5, 4, "left"), (5, -11, "left"), (-5, 4, "right"), (-5, -11, "right")]
    for (x, y, hollow, x_sd, y_sd), names in points.items():
        if x_sd or y_sd:
            ax.errorbar([x], [y], xerr=[x_sd], yerr=[y_sd], color="C0", capsize=3, lw=1)
        ax.scatter([x], [y], s=50, color="none" if hollow else "C0", edgecolors="C0")
        near = sum(1 for px, py in placed if abs(px - x) < 0.05 * span_x and abs(py - y) < 0.05 * span_y)
        dx, dy, ha = offsets[near % len(offsets)]
        ax.annotate(", ".join(names), (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=8, ha=ha)
        placed.append((x, y))
    # each axis from 0 to its own best (search and recommendation numbers differ in scale);
    # the room on the right keeps the labels inside
    ax.set_xlim(0, max(xs + [1e-3]) * 1.3)
    ax.set_ylim(0, max(ys + [1e-3]) * 1.15)
    label = "full-catalogue ranking" if protocol == "full" else "paper protocol (100 candidates)"
    ax.set_xlabel(f"Recommendation {metric}")
    ax.set_ylabel(f"Search {metric}")
    ax.set_title(f"Search vs recommendation, {label}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def report_dir(cfg: PipelineConfig, name: str) -> Path:
    return Warehouse(cfg.warehouse).path("reports", name)


def write_report(cfg: PipelineConfig, results: dict, name: str) -> dict:
    """Write report.md, metrics.json and tradeoff.png to `<warehouse>/reports/<name>/` in one
    swap; returns {'dir': ..., 'report.md': ..., 'metrics.json': ..., 'tradeoff.png': ...}."""
    target = report_dir(cfg, name)
    with atomic_dir(target) as stage:
        (stage / "report.md").write_text(markdown_report(results))
        write_json_atomic(stage / "metrics.json", json.loads(json.dumps(results, default=str)))
        plot_tradeoff(results, stage / "tradeoff.png")
    return {"dir": str(target), **{f: str(target / f) for f in FILES}}


# ---------------------------------------------------------------- the registry gate's decision
REPORT_TITLE = "# Evaluation report"


def gate_note(gate: dict) -> str:
    """The lines the register step puts above the report's title: the decision and its reason
    first ('Not promoted: loses to <baseline> on <task> by X [lo, hi]'), then the paired numbers.
    `gate`: registry.register's result with the gate's split and case count."""
    lines = [f"**Registry gate** ({gate['model_name']} version {gate['version']}, "
             f"alias {'champion' if gate['promoted'] else 'challenger'}): {gate['reason']}.", ""]
    if gate.get("baselines"):
        lines += [f"The gate's cases ({gate['split']} split, full-catalogue ranking, at most "
                  f"{gate['max_cases'] or 'all'} a task), paired with the best baseline of each task "
                  f"(difference and 95% interval): "
                  + "; ".join(f"{TASK_LABELS[t].lower()} {p['diff']:+.4f} [{p['low']:+.4f}, {p['high']:+.4f}] "
                              f"{p['metric']} vs {p['against']}" for t, p in gate["baselines"].items()) + ".", ""]
    return "\n".join(lines + ["---", ""])


def with_gate_note(markdown: str, note: str) -> str:
    """`markdown` with `note` as its first lines; whatever stood above the title (the note of an
    earlier try of the register step) is replaced, so a retry does not stack notes."""
    start = markdown.find(REPORT_TITLE)
    return note + "\n" + (markdown[start:] if start >= 0 else markdown)


def write_gate_note(path: str | Path, gate: dict) -> None:
    """Put the gate's note at the top of report.md at `path`, atomically (a reader sees the old
    report or the new one, never half of it)."""
    write_text_atomic(path, with_gate_note(Path(path).read_text(), gate_note(gate)))


def flat_metrics(results: dict) -> dict[str, float]:
    """{'<method>/<protocol>/<task>/<metric>': value} for MLflow."""
    out = {}
    for method, by_protocol in results["methods"].items():
        for protocol, by_task in by_protocol.items():
            for task, metrics in (by_task or {}).items():
                for key, value in (metrics or {}).items():
                    if isinstance(value, (int, float)) and key not in ("seconds",):
                        out[f"eval/{method}/{protocol}/{task}/{key}"] = value
    for section, label in (("paired", "paired"), ("paired_headline", "paired_gensar")):
        for method, by_task in results.get(section, {}).items():
            for task, p in by_task.items():
                for key in ("diff", "low", "high"):
                    out[f"eval/{method}/{label}/{task}/{key}"] = p[key]
    for name, by_protocol in results.get("seed_summary", {}).items():
        for protocol, by_task in by_protocol.items():
            for task, stats in (by_task or {}).items():
                for key, s in (stats or {}).items():
                    out[f"eval/{name}@mean/{protocol}/{task}/{key}"] = s["mean"]
                    out[f"eval/{name}@sd/{protocol}/{task}/{key}"] = s["sd"]
    return out


def log_to_mlflow(cfg: PipelineConfig, results: dict, paths: dict, run_name: Optional[str] = None) -> str:
    """Log the metrics and the report folder to MLflow; returns the run id. A tracking failure is
    raised, so a broken store fails the evaluate task instead of leaving it green and unrecorded
    (the report files are already written, so a retry only logs again)."""
    tracking.silence_mlflow_warnings()
    name = run_name or f"evaluate|{results.get('meta', {}).get('name', '')}"
    with tracking.start_run(cfg, name, tags={"step": "evaluate"}) as run:
        tracking.log_metrics(flat_metrics(results))
        tracking.log_artifact(paths["dir"], "report")
        return run.info.run_id
