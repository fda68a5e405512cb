"""The MLflow model registry: register a trained model as a pyfunc, promote it past a gate.

A new version becomes the champion (alias `champion`) only if its validation metric
(`registry.metric`, full-catalogue protocol, `registry.split`) beats the current champion's on
both recommendation and search, and (`registry.compare_baselines`) it does not lose to the best
baseline of either task beyond chance: paired on the same cases, the 95% bootstrap interval of
(new - best baseline) per-case NDCG lies entirely below 0. Otherwise it gets the alias
`challenger`. The numbers the gate used and the reason are kept as version tags, so the decision
can be read back in the MLflow UI; the register step also writes it to `reports/gate.json` and
to the top of the evaluation report (`publish_gate`).
"""
from __future__ import annotations

import importlib.metadata as md
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import mlflow
import pandas as pd
import yaml
from mlflow.exceptions import MlflowException

from gensar_core import tracking
from gensar_core.baselines import build_baselines
from gensar_core.config import PipelineConfig
from gensar_core.evaluate.context import EvalContext
from gensar_core.evaluate.protocols import evaluate_ranker
from gensar_core.evaluate.report import paired_against_best, report_dir, write_gate_note
from gensar_core.evaluate.run import report_name
from gensar_core.model.corpus import apply_id_scheme
from gensar_core.model.ensemble import member_dirs
from gensar_core.model.generative_ranker import DecodeSettings, GenerativeRanker, ranker_settings
from gensar_core.storage import Warehouse, read_table, write_json_atomic

log = logging.getLogger(__name__)
CHAMPION, CHALLENGER = "champion", "challenger"
TASKS = ("rec", "search")
SERVING_CODE = Path(__file__).with_name("serving_model.py")
MEMBER = "member"  # artifact names of an ensemble's other members: member1, member2, ...


def gate_config(cfg: PipelineConfig) -> PipelineConfig:
    """`cfg` as the gate ranks: full ranking only, a seeded draw of `registry.max_cases` cases of
    `registry.split`. The split is also set as the evaluated one because a baseline tuned on "the
    split before the scored one" (the two-stage blend weight) must not tune on the gate's cases."""
    return cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(update={
        "protocols": ["full"], "max_cases": cfg.registry.max_cases, "split": cfg.registry.split})})


def gate_metrics(cfg: PipelineConfig, ranker, *, ctx: EvalContext | None = None,
                 per_case: dict | None = None) -> dict[str, float]:
    """The gate's numbers for a ranker: `registry.metric` per task, full ranking on `registry.split`
    (`ctx`: a context of `gate_config(cfg)` to share; `per_case`: filled as evaluate_ranker does)."""
    result = evaluate_ranker(ranker, gate_config(cfg), cfg.registry.split, ctx=ctx, per_case=per_case)["full"]
    return {task: float((result.get(task) or {}).get(cfg.registry.metric, 0.0)) for task in TASKS}


def compare_with_baselines(cfg: PipelineConfig, ctx: EvalContext, per_case: dict) -> dict[str, dict]:
    """The new model (its per-case scores `per_case` on `ctx`'s cases) against the best baseline of
    each task: the baselines the evaluate step runs (baselines.build_baselines), ranked on the
    same cases, the best by `registry.metric`, paired with report.paired_against_best.

    {task: {against, diff, low, high, n, metric, baselines: {name: registry.metric}}}; a task no
    baseline (or the model) handles is left out. `metric` names the per-case score the interval is
    on: NDCG at the largest of `evaluate.ks`, as in the evaluation report."""
    methods, scores = {}, {CHALLENGER: per_case}
    try:
        rankers = build_baselines(ctx)
    except FileNotFoundError as err:  # a baseline's input (features/sasrec, features/semantic)
        raise FileNotFoundError(f"{err} (the registry gate compares with the evaluate step's baselines; "
                                f"registry.compare_baselines: false turns that off)") from err
    if CHALLENGER in rankers:
        raise ValueError(f"a baseline is named {CHALLENGER!r}, the gate's name for the new model")
    for name, ranker in rankers.items():
        scores[name] = {}
        methods[name] = evaluate_ranker(ranker, ctx.cfg, cfg.registry.split, ctx=ctx, protocols=["full"],
                                        per_case=scores[name])
    paired = paired_against_best(methods, scores, list(rankers), metric=cfg.registry.metric,
                                 seed=cfg.seed).get(CHALLENGER, {})
    metric = f"NDCG@{max(ctx.cfg.evaluate.ks)}"
    return {task: {**p, "metric": metric,
                   "baselines": {name: float(by["full"][task][cfg.registry.metric])
                                 for name, by in methods.items() if by["full"].get(task)}}
            for task, p in paired.items()}


def gate_evaluation(cfg: PipelineConfig, ranker) -> tuple[dict[str, float], dict | None]:
    """The gate's numbers for `ranker` (gate_metrics) and, with `registry.compare_baselines`, its
    comparison with the best baselines on the same cases (compare_with_baselines; else None)."""
    ctx = EvalContext(gate_config(cfg))  # one draw of cases, shared by the model and the baselines
    per_case: dict = {}
    metrics = gate_metrics(cfg, ranker, ctx=ctx, per_case=per_case)
    if not cfg.registry.compare_baselines:
        return metrics, None
    return metrics, compare_with_baselines(cfg, ctx, per_case)


def beats(new: dict[str, float], champion: dict[str, float] | None) -> bool:
    """Promote only a model better on both tasks (the first model always wins)."""
    return champion is None or all(new[t] > champion[t] for t in TASKS)


def losses(baselines: dict[str, dict] | None) -> dict[str, dict]:
    """The tasks on which the model loses to the best baseline beyond chance: the interval of the
    difference lies entirely below 0 (one that holds 0 the choice of cases alone can explain)."""
    return {task: p for task, p in (baselines or {}).items() if p["high"] < 0}


def interval(p: dict) -> str:
    return f"{p['diff']:+.4f} {p['metric']} [{p['low']:+.4f}, {p['high']:+.4f}]"


def decision_reason(promoted: bool, metrics: dict[str, float], champion_metrics: dict[str, float] | None,
                    champion_version: str | None, baselines: dict | None) -> str:
    """One line saying why the gate decided as it did (the `gate.reason` tag, the report's first line)."""
    if promoted:
        why = ("the first model" if champion_metrics is None else
               f"better than champion version {champion_version} on both tasks")
        return f"Promoted: {why}" + ("; baselines not compared (registry.compare_baselines: false)"
                                     if baselines is None else "; no baseline beats it beyond chance")
    parts = [f"loses to {p['against']} on {task} by {interval(p)}" for task, p in losses(baselines).items()]
    if not beats(metrics, champion_metrics):
        parts.append(f"not better than champion version {champion_version} on both tasks ("
                     + ", ".join(f"{t} {metrics[t]:.4f} vs {champion_metrics[t]:.4f}" for t in TASKS) + ")")
    return "Not promoted: " + "; ".join(parts)


def _champion(client, name: str):
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def register(cfg: PipelineConfig, model_dir: str | Path, metrics: dict[str, float],
             baselines: dict[str, dict] | None = None) -> dict:
    """Log `model_dir` as a pyfunc model version and apply the gate: the champion rule, and with
    `baselines` (compare_with_baselines; None: not compared) the rule that a model losing to a
    baseline beyond chance stays challenger."""
    name = cfg.registry.model_name
    with tracking.start_run(cfg, f"register {Path(model_dir).name}", tags={"gensar.step": "register"}) as run:
        tracking.log_metrics({f"gate/{t}/{cfg.registry.metric}": v for t, v in metrics.items()})
        tracking.log_metrics({f"gate/{t}/vs_best_baseline/{key}": p[key]
                              for t, p in (baselines or {}).items() for key in ("diff", "low", "high")})
        with tempfile.TemporaryDirectory() as tmp:
            settings = Path(tmp) / "settings.json"
            settings.write_text(json.dumps(ranker_settings(cfg).to_json()))
            identifiers = Path(cfg.warehouse) / "identifiers" / "items"
            if cfg.corpus.id_scheme != "dual":  # the table as this model speaks it
                identifiers = Path(tmp) / "items.parquet"
                apply_id_scheme(read_table(Path(cfg.warehouse) / "identifiers" / "items"),
                                cfg.corpus.id_scheme).to_parquet(identifiers, index=False)
            members = {f"{MEMBER}{n}": str(folder) for n, folder in enumerate(member_dirs(cfg), 1)}
            info = mlflow.pyfunc.log_model(
                name="model", python_model=str(SERVING_CODE),
                artifacts={"model": str(model_dir),
                           "identifiers": str(identifiers),
                           "settings": str(settings), **members},
                code_paths=[str(Path(__file__).parent)],
                pip_requirements=_requirements(), registered_model_name=name)
        run_id = run.info.run_id
    client = tracking.client(cfg)
    version = str(info.registered_model_version)
    for task, value in metrics.items():
        client.set_model_version_tag(name, version, f"gate.{task}", f"{value:.6f}")
    current = _champion(client, name)
    champion_metrics = ({t: float(current.tags.get(f"gate.{t}", 0.0)) for t in TASKS}
                        if current is not None else None)
    promoted = beats(metrics, champion_metrics) and not losses(baselines)
    reason = decision_reason(promoted, metrics, champion_metrics, str(current.version) if current else None,
                             baselines)
    client.set_registered_model_alias(name, CHAMPION if promoted else CHALLENGER, version)
    client.set_model_version_tag(name, version, "gate.decision", "champion" if promoted else "challenger")
    client.set_model_version_tag(name, version, "gate.reason", reason)
    for task, p in (baselines or {}).items():
        client.set_model_version_tag(name, version, f"gate.baseline.{task}", f"{interval(p)} vs {p['against']}")
    log.info("registered %s version %s: %s (new %s vs champion %s)", name, version, reason, metrics,
             champion_metrics)
    return {"model_name": name, "version": version, "promoted": promoted, "metrics": metrics,
            "champion_metrics": champion_metrics, "baselines": baselines, "reason": reason, "run_id": run_id,
            "champion_version": version if promoted else (str(current.version) if current else None)}


def register_with_gate(cfg: PipelineConfig, model_dir: str | Path, ranker) -> dict:
    """The register step: the gate's numbers for `ranker` (the model of `model_dir`), the model
    registered past the gate, and the decision published (publish_gate)."""
    metrics, baselines = gate_evaluation(cfg, ranker)
    result = register(cfg, model_dir, metrics, baselines)
    return {**result, **publish_gate(cfg, result)}


def gate_file(cfg: PipelineConfig) -> Path:
    return Warehouse(cfg.warehouse).path("reports", "gate.json")


def publish_gate(cfg: PipelineConfig, result: dict) -> dict:
    """Write the gate's decision to `reports/gate.json` and to the first lines of this run's
    evaluation report. The DAG runs evaluate before register, so the report exists and cannot
    know the decision itself: register adds it (replacing the note of an earlier try).
    Returns {'gate_file', 'report'} (report: None when there is no evaluation report)."""
    report = report_dir(cfg, report_name(cfg)) / "report.md"
    gate = {**result, "ds": cfg.ds, "split": cfg.registry.split, "max_cases": cfg.registry.max_cases,
            "gate_metric": cfg.registry.metric, "report": str(report) if report.exists() else None}
    write_json_atomic(gate_file(cfg), gate)
    if report.exists():
        write_gate_note(report, gate)
    else:
        log.info("no evaluation report at %s: the gate's decision is in %s only", report, gate_file(cfg))
    return {"gate_file": str(gate_file(cfg)), "report": gate["report"]}


def _requirements() -> list[str]:
    pins = []
    for dist in ("torch", "transformers", "tokenizers", "safetensors", "pandas", "pyarrow", "pydantic", "mlflow"):
        try:
            pins.append(f"{dist}=={md.version(dist).split('+')[0]}")
        except md.PackageNotFoundError:
            pass
    return pins


def champion_uri(cfg: PipelineConfig) -> str:
    return f"models:/{cfg.registry.model_name}@{CHAMPION}"


def champion_ranker(cfg: PipelineConfig):
    """The champion model as a ranker over today's identifier table when it extends the one the
    champion was trained with (incremental IDs: new items are recommendable from day one), else
    over the champion's own table."""

    local = champion_download(cfg)
    if local is None:
        raise RuntimeError(f"no champion model in the registry ({champion_uri(cfg)}): run train and register first")
    artifacts = _artifact_paths(local)
    theirs = pd.read_parquet(artifacts["identifiers"])
    ours_path = Warehouse(cfg.warehouse).identifiers / "items"
    ids = theirs
    if ours_path.exists():
        ours = Warehouse(cfg.warehouse).read("identifiers/items")
        cols = ["item_id", "semantic_id", "collaborative_id"]
        kept = theirs[cols].merge(ours[cols], on=cols, how="inner")
        if len(kept) == len(theirs):
            ids = ours
    settings = DecodeSettings.from_json(json.loads(Path(artifacts["settings"]).read_text()))
    return GenerativeRanker(artifacts["model"], ids, settings, members=logged_members(artifacts))


def logged_members(artifacts: dict) -> list:
    """The ensemble members logged beside a registered model ('member1', 'member2', ...), in order."""
    names = sorted((k for k in artifacts if k.startswith(MEMBER)), key=lambda k: int(k[len(MEMBER):]))
    return [artifacts[k] for k in names]


def _artifact_paths(local: Path) -> dict[str, Path]:
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    return {k: local / v["path"] for k, v in mlmodel["flavors"]["python_function"]["artifacts"].items()}


def champion_download(cfg: PipelineConfig) -> Path | None:
    """A local copy of the champion's registered model, or None without a champion.

    One folder per version, filled once and renamed into place: the mapped batch_score tasks
    download at the same moment, and a version's files never change, so no process may delete
    a copy that another one is reading (a shared folder emptied first made them fail)."""
    tracking.configure(cfg)
    current = _champion(tracking.client(cfg), cfg.registry.model_name)
    if current is None:
        return None
    root = Path(cfg.warehouse) / "champion"
    dst = root / f"v{current.version}"
    if (dst / "MLmodel").exists():
        return dst
    root.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".download-", dir=root))
    try:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{cfg.registry.model_name}/{current.version}", dst_path=str(stage))
        try:
            os.rename(local, dst)
        except OSError:  # another process put the same version there first
            if not (dst / "MLmodel").exists():
                raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return dst


def champion_model_dir(cfg: PipelineConfig) -> Path | None:
    """A local copy of the champion's model folder (weights + tokenizer), or None without one."""
    local = champion_download(cfg)
    return _artifact_paths(local)["model"] if local is not None else None
