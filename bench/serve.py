"""Online serving latency: `mlflow models serve` of a GenSAR model on 127.0.0.1 under a bounded load.

Sends `--requests` POST /invocations (each `--rows` rows drawn from the warehouse's test split:
its mix of rec and search cases, with their histories and queries, k=10), `--concurrency` at a
time, after a few warm-up requests, and prints p50 / p99 latency, throughput and the error count.
The baseline, measured in the same run against the same server at the same concurrency, is its
GET /ping: a full HTTP round trip through the same uvicorn server without the model, so
p50 / ping p50 says how many times a bare request an answer costs (the model's share of it).

    python bench/serve.py --toy                     # trains a toy model on the tests' toy warehouse
                                                    #   (30 items, ~1 minute) and serves it
    python bench/serve.py --toy --formulation timeline   # the same with the timeline formulation
    python bench/serve.py                           # after `make run`: models:/gensar@champion of
                                                    #   $GENSAR_HOME/mlflow/mlflow.db, rows from $GENSAR_HOME/warehouse
    python bench/serve.py --url http://127.0.0.1:5001 --warehouse .gensar/warehouse   # a running server
                                                    #   (infra/serve_model.sh)
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runnable from a checkout

from gensar_core import serving  # noqa: E402
from gensar_core.config import PipelineConfig, gensar_home  # noqa: E402


def train_toy_model(root: Path, formulation: str) -> PipelineConfig:
    """A tiny model really trained on the tests' toy warehouse (as their `toy_model` fixture)."""
    import pandas as pd

    sys.path.insert(0, str(ROOT / "tests"))
    from toy_warehouse import write_toy_warehouse

    from gensar_core.pipeline import step_build_corpus, step_train
    from gensar_core.storage import Warehouse, atomic_dir, write_table

    write_toy_warehouse(root / "wh")
    wh = Warehouse(root / "wh")
    events = pd.concat([wh.read(f"splits/{s}") for s in ("train", "valid", "test")])
    with atomic_dir(wh.path("curated")) as stage:  # the toy warehouse has splits; curated = their union
        write_table(wh.read("curated/items"), stage / "items")
        write_table(events[["user_id", "item_id", "ts", "behavior", "query", "session_id"]], stage / "events")
    cfg = PipelineConfig.model_validate({
        "warehouse": str(root / "wh"), "tracking": {"uri": f"sqlite:///{root / 'mlflow.db'}"},
        "identifiers": {"shared_levels": 2, "specific_levels": 2, "codebook_size": 8},
        "model": {"formulation": formulation,
                  "prompted": {"scratch": {"d_model": 32, "d_ff": 64, "d_kv": 8, "num_heads": 2,
                                           "tokenizer_vocab_size": 300}, "batch_size": 16},
                  "timeline": {"max_len": 128, "d_model": 32, "d_ff": 64, "num_heads": 2}},
        "train": {"epochs": 2, "eval_every": 0, "warmup_steps": 5, "progress": False,
                  "ensemble_seeds": []},  # one model, as the tests' toy model
        "evaluate": {"beam_size": 10, "baselines": ["popularity"], "log_mlflow": False},
    })
    step_build_corpus(cfg)
    step_train(cfg)
    return cfg


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="a running server (else one is started here)")
    p.add_argument("--model-uri", default="models:/gensar@champion")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                   help="default: $MLFLOW_TRACKING_URI, else sqlite:///$GENSAR_HOME/mlflow/mlflow.db")
    p.add_argument("--warehouse", help="where request rows come from (default $GENSAR_HOME/warehouse)")
    p.add_argument("--toy", action="store_true", help="train and serve the toy model instead")
    p.add_argument("--formulation", choices=["prompted", "timeline"], default="prompted", help="of the toy model")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--rows", type=int, default=1, help="rows per request")
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    with contextlib.ExitStack() as stack:
        warehouse, tracking_uri, model_uri = args.warehouse, args.tracking_uri, args.model_uri
        if args.toy:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gensar-serve-")))
            print("training the toy model ...", flush=True)
            cfg = train_toy_model(root, args.formulation)
            tracking_uri = f"sqlite:///{root / 'serving.db'}"
            model_uri, warehouse = serving.register_champion(cfg, tracking_uri), cfg.warehouse
        warehouse = warehouse or str(gensar_home() / "warehouse")
        tracking_uri = tracking_uri or f"sqlite:///{gensar_home() / 'mlflow' / 'mlflow.db'}"
        url = args.url
        if url is None:
            print(f"starting mlflow models serve -m {model_uri} ({tracking_uri}) ...", flush=True)
            url = stack.enter_context(serving.model_server(model_uri, tracking_uri))
        url = url.rstrip("/")

        rows = serving.sample_rows(warehouse, (args.requests + args.warmup) * args.rows, seed=args.seed)
        bodies = [serving.invocation(rows[i * args.rows:(i + 1) * args.rows])
                  for i in range(args.requests + args.warmup)]
        rec = sum(r["task"] == "rec" for r in rows[args.warmup * args.rows:])
        serving.load_test(f"{url}/invocations", bodies[:args.warmup], args.concurrency)
        ping = serving.load_test(f"{url}/ping", [None] * args.requests, args.concurrency)
        inv = serving.load_test(f"{url}/invocations", bodies[args.warmup:], args.concurrency)

    print(f"\n{url}: {args.requests} requests x {args.rows} rows ({rec} rec, "
          f"{args.requests * args.rows - rec} search rows, k=10), concurrency {args.concurrency}")
    for name, r in (("/invocations", inv), ("/ping (baseline)", ping)):
        print(f"  {name:17s} p50 {r['p50_ms']:8.1f} ms  p99 {r['p99_ms']:8.1f} ms  "
              f"{r['per_second']:7.1f} requests/s  errors {r['errors']} {r['error_statuses'] or ''}")
    print(f"  rows/s {inv['per_second'] * args.rows:.1f}")
    print(f"  ratio p50 /invocations : /ping = {inv['p50_ms'] / ping['p50_ms']:.1f}x "
          "(an answer costs this many bare HTTP round trips through the same server)")
    if inv["errors"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
