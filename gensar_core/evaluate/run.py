"""`run_evaluate`: every baseline (and any plugged-in ranker) on the held-out split, both
protocols, both tasks, into one report.

The generative GenSAR models come in through `extra_rankers` ({name: Ranker}); they get the same
cases and candidates as the baselines (see gensar_core.evaluate.ranking for the interface).
"""
from __future__ import annotations

import logging
import time
from typing import Optional

from gensar_core.baselines import build_baselines
from gensar_core.config import PipelineConfig
from gensar_core.embed.sasrec import tuned_seeds
from gensar_core.evaluate.context import TASKS, EvalContext
from gensar_core.evaluate.protocols import evaluate_ranker
from gensar_core.evaluate.ranking import Ranker
from gensar_core.evaluate.report import (log_to_mlflow, paired_against, paired_against_best, seed_groups, seed_summary,
                                         write_report)

log = logging.getLogger(__name__)


def report_name(cfg: PipelineConfig) -> str:
    ecfg = cfg.evaluate
    return ecfg.report_name or f"eval-{ecfg.split}" + (f"-{cfg.ds}" if cfg.ds else "")


def run_evaluate(cfg: PipelineConfig, extra_rankers: Optional[dict[str, Ranker]] = None, *,
                 ctx: Optional[EvalContext] = None) -> dict:
    """Evaluate `evaluate.baselines` + `extra_rankers` on `evaluate.split`; write the report.

    Returns {'split', 'cases', 'methods': {name: {protocol: {task: metrics}}}, 'report': paths,
    'mlflow_run_id', 'seconds'}.
    """
    started = time.perf_counter()
    ecfg = cfg.evaluate
    ctx = ctx or EvalContext(cfg)
    rankers: dict[str, Ranker] = build_baselines(ctx)
    baselines = list(rankers)
    for name, ranker in (extra_rankers or {}).items():
        if name in rankers:
            raise ValueError(f"extra ranker {name!r} has a baseline's name")
        if not isinstance(ranker, Ranker):
            raise TypeError(f"extra ranker {name!r} has no rank(cases, task, k, candidates) method")
        rankers[name] = ranker

    cases = {task: len(ctx.cases(ecfg.split, task)) for task in TASKS}
    methods, descriptions, info, per_case, timing = {}, {}, {}, {}, {}
    for name, ranker in rankers.items():
        t0 = time.perf_counter()
        per_case[name] = {}
        methods[name] = evaluate_ranker(ranker, cfg, ecfg.split, ctx=ctx, per_case=per_case[name])
        # wall time over every case ranked (each protocol and task): a cost to put beside quality
        elapsed, ranked = time.perf_counter() - t0, sum(len(scores) for scores in per_case[name].values())
        timing[name] = {"seconds": round(elapsed, 2), "cases_ranked": ranked,
                        "ms_per_case": round(1000 * elapsed / max(ranked, 1), 3)}
        descriptions[name] = getattr(ranker, "description", "") or type(ranker).__name__
        info[name] = ranker.info() if hasattr(ranker, "info") else {}
        log.info("evaluate %s: %.1fs %s", name, time.perf_counter() - t0,
                 {p: {t: (m or {}).get("NDCG@10") for t, m in by.items()} for p, by in methods[name].items()})

    name = report_name(cfg)
    results = {
        "methods": methods,
        "descriptions": descriptions,
        "info": info,
        "timing": timing,
        "meta": {
            "name": name, "split": ecfg.split, "cases": cases, "protocols": list(ecfg.protocols),
            "ks": sorted(set(ecfg.ks)), "num_candidates": ecfg.num_candidates,
            "history_excluded": "full protocol: the items of every event of the user before the case "
                                "are removed from the ranking",
            "config": cfg.fingerprint(), "seconds": round(time.perf_counter() - started, 2),
            **ctx.describe(),
        },
    }
    results["paired"] = paired_against_best(methods, per_case, baselines, seed=cfg.seed)
    if "gensar" in per_case:
        results["paired_headline"] = paired_against(per_case, {task: "gensar" for task in TASKS}, skip=baselines,
                                                    seed=cfg.seed)
    if ecfg.compare:
        missing = [m for pair in ecfg.compare for m in pair if m not in per_case]
        if missing:
            raise ValueError(f"evaluate.compare names {sorted(set(missing))}, which this evaluation does not rank")
        results["compare"] = {
            f"{method} vs {against}": paired_against({method: per_case[method], against: per_case[against]},
                                                     {t: against for t in TASKS}, seed=cfg.seed).get(method, {})
            for method, against in ecfg.compare}
    seeds = dict(ecfg.seeds)
    if "sasrec-x3" in rankers:  # build_baselines adds its members alone as 'sasrec@seed<S>' rows
        seeds["sasrec"] = tuned_seeds(cfg.seed, cfg.train.ensemble_seeds)[1:]
    groups = seed_groups(seeds, list(methods))
    if groups:
        results.update(seed_groups=groups, seed_summary=seed_summary(methods, groups))
    paths = write_report(cfg, results, name)
    run_id = log_to_mlflow(cfg, results, paths) if ecfg.log_mlflow else None
    return {"split": ecfg.split, "cases": cases, "methods": methods, "info": info, "report": paths,
            "mlflow_run_id": run_id, "seconds": round(time.perf_counter() - started, 2)}
