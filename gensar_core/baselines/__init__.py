"""Baselines, each a `Ranker` (gensar_core.evaluate.ranking), built from one `EvalContext`.

    popularity    train clicks                                   (popularity.py)
    sasrec        SASRec over the full interleaved sequence      (sasrec.py; tuned: tuning.py)
    sasrec-x3     the tuned SASRec at three seeds, averaged      (needs tune_baselines; with it
                  each other seed's model alone, 'sasrec@seed<S>', for the seed spread)
    query-sasrec  SASRec that also reads the query               (needs tune_baselines)
    bm25          BM25 over item text                            (bm25.py)
    dense         MiniLM query / history-mean vs item vectors    (dense.py)
    bm25+sasrec   BM25's top N re-ranked with SASRec             (two_stage.py)
    dense+sasrec  dense top N re-ranked with SASRec              (two_stage.py)
"""
from __future__ import annotations

from typing import Optional, Sequence

from gensar_core.baselines.bm25 import BM25Ranker
from gensar_core.baselines.dense import DenseRanker
from gensar_core.baselines.popularity import PopularityRanker
from gensar_core.baselines.sasrec import SASRecRanker
from gensar_core.baselines.two_stage import TwoStageRanker
from gensar_core.embed.sasrec import tuned_seeds
from gensar_core.evaluate.report import seed_row

BASELINES = ("popularity", "sasrec", "sasrec-x3", "query-sasrec", "bm25", "dense", "bm25+sasrec", "dense+sasrec")
TUNED_ONLY = ("sasrec-x3", "query-sasrec")

__all__ = ["BASELINES", "build_baselines", "PopularityRanker", "SASRecRanker", "BM25Ranker",
           "DenseRanker", "TwoStageRanker"]


def build_baselines(ctx, names: Optional[Sequence[str]] = None) -> dict:
    """{name: ranker} for the named baselines (default `evaluate.baselines`), in BASELINES order.

    Rankers share one SASRec / BM25 / dense instance; a missing input (features/sasrec,
    features/semantic) fails here with the step to run.
    """
    names = list(names if names is not None else ctx.cfg.evaluate.baselines)
    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        raise ValueError(f"unknown baseline(s) {unknown}; baselines are {list(BASELINES)}")
    untuned = [n for n in names if n in TUNED_ONLY and not ctx.tuned(n.removesuffix("-x3"))]
    if untuned:
        raise FileNotFoundError(f"baseline(s) {untuned} need the tuned models of the tune_baselines step "
                                f"under {ctx.cfg.warehouse}/models/baselines: run `gensar tune_baselines`")
    makers = {"popularity": PopularityRanker, "sasrec": SASRecRanker, "bm25": BM25Ranker, "dense": DenseRanker,
              "sasrec-x3": lambda ctx: SASRecRanker(ctx, ctx.tuned("sasrec"), "sasrec-x3"),
              "query-sasrec": lambda ctx: SASRecRanker(ctx, ctx.tuned("query-sasrec")[:1], "query-sasrec",
                                                       query_aware=True)}
    shared: dict = {}

    def get(name):
        if name not in shared:
            shared[name] = makers[name](ctx)
        return shared[name]

    out = {}
    for name in BASELINES:
        if name not in names:
            continue
        if "+" in name:
            first, second = name.split("+")
            out[name] = TwoStageRanker(ctx, get(first), get(second), name=name)
        else:
            out[name] = get(name)
        if name == "sasrec-x3":  # its members alone: SASRec's seed spread beside the generative model's
            seeds = tuned_seeds(ctx.cfg.seed, ctx.cfg.train.ensemble_seeds)
            for seed, model in list(zip(seeds, ctx.tuned("sasrec")))[1:]:
                out[seed_row("sasrec", seed)] = SASRecRanker(ctx, [model], seed_row("sasrec", seed))
    # load what each needs now, so a missing input fails before any evaluation runs
    if any(n in names for n in ("sasrec", "bm25+sasrec", "dense+sasrec")):
        ctx.sasrec
    if any(n in names for n in ("dense", "dense+sasrec")):
        ctx.semantic_vectors
    return out
