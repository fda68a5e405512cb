"""Training efficiency: the timeline formulation against the paper's prompted T5 recipe, one run.

Both learn from the same warehouse (splits, identifiers and the prompted corpus of
`build_corpus`), on the same device, with the pipeline's own pieces: the timeline model of
`model.timeline` with `timeline_train`'s data, step and validation; the scratch T5 of
`model.prompted.scratch` with `encode_examples`, `collate` and the same AdamW step as `run_train`.

1. Supervised identifier tokens per second: the identifier tokens that carry a loss (the 4 ID
   tokens of each target; the timeline's rec and search ID tokens), per second of training.
   The two alternate for `--repeats` rounds of `--seconds` each and the best round is kept, so
   load from other processes skews the ratio less.
2. Wall time to a fixed validation NDCG@10 (`--target`, the mean of recommendation and search,
   full ranking, history banned, on `--valid-cases` valid cases per task): each trains from
   scratch for at most `--budget` seconds, validated every `--eval-seconds` (validation time
   not counted). A recipe that does not reach the target within the budget is reported as
   "> budget", and the ratio as a lower bound.

    python bench/train.py --warehouse .gensar/warehouse [--target 0.03 --budget 600]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from gensar_core.config import load_config  # noqa: E402
from gensar_core.model import timeline_train as tt  # noqa: E402
from gensar_core.model.backbone import Backbone, load_backbone  # noqa: E402
from gensar_core.model.corpus import read_corpus  # noqa: E402
from gensar_core.model.data import collate, encode_examples  # noqa: E402
from gensar_core.model.generative_ranker import GenerativeRanker, ranker_settings  # noqa: E402
from gensar_core.model.timeline import REC_ID, SEARCH_ID, batches, collate_windows  # noqa: E402


class Timeline:
    name = "timeline (ours)"

    def __init__(self, cfg):
        self.cfg = cfg
        self.data = tt.load_data(cfg)
        self.model = tt.build_model(self.data.tokenizer, cfg.model, cfg.seed).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                                     betas=(0.9, 0.98))
        self.rng = np.random.default_rng(0)
        self.step_no, self.queue = 0, []
        per_epoch = len(batches(tt.epoch_windows(self.data, cfg.model.timeline, np.random.default_rng(0)),
                                cfg.model.timeline.tokens_per_batch, self.rng))
        self.total = per_epoch * cfg.train.epochs  # the schedule of a full training run
        self.id_tokens = torch.tensor(sorted({int(t) for ids, kinds, _ in self.data.timelines
                                              for t in ids[np.isin(kinds, (REC_ID, SEARCH_ID))]}))
        backbone = Backbone(self.model, self.data.tokenizer, "causal", "timeline",
                            {"formulation": "timeline", "max_len": cfg.model.timeline.max_len})
        self.ranker = GenerativeRanker(backbone, self.data.identifiers, ranker_settings(cfg, validation=True))
        self.loss_weights = tt.kind_loss_weights(self.data, cfg.model.timeline)

    def step(self) -> int:
        if not self.queue:
            self.windows = tt.epoch_windows(self.data, self.cfg.model.timeline, self.rng)
            self.queue = batches(self.windows, self.cfg.model.timeline.tokens_per_batch, self.rng)
        batch = collate_windows(self.windows, self.queue.pop(), self.data.tokenizer.pad_token_id, self.loss_weights,
                                self.cfg.model.timeline.pad_batch_shape)
        lr = tt.lr_at(self.step_no, self.total, self.cfg.train.lr, self.cfg.train.warmup_steps, 0.0)
        tt.train_step(self.model, self.opt, batch, lr, 1.0, lambda: tt.autocast(torch.device("cpu"), "auto"))
        self.step_no += 1
        return int(torch.isin(batch["labels"], self.id_tokens).sum())


class PromptedT5:
    name = "prompted T5 (paper)"

    def __init__(self, cfg):
        self.cfg = cfg
        df, _ = read_corpus(cfg)
        train = df[df["split"] == "train"].reset_index(drop=True)
        self.bb = load_backbone(cfg, corpus_texts=list(train["input_text"]) + list(train["target_text"]), seed=0)
        self.model = self.bb.model.train()
        self.enc = encode_examples(self.bb.tokenizer, "seq2seq", train["input_text"].tolist(),
                                   train["target_text"].tolist(), cfg.model.prompted.max_input_length,
                                   cfg.model.prompted.max_target_length)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                                     betas=(0.9, 0.98))
        self.order = np.random.default_rng(0).permutation(len(self.enc))
        self.pos, self.step_no = 0, 0
        vocab = self.bb.tokenizer.get_vocab()
        self.id_tokens = torch.tensor(sorted(i for t, i in vocab.items() if t.startswith("<") and t[2:3] == "_"))
        self.ranker = GenerativeRanker(self.bb, tt.load_data(cfg).identifiers, ranker_settings(cfg, validation=True))

    def step(self) -> int:
        bs = self.cfg.model.prompted.batch_size
        if self.pos + bs > len(self.order):
            self.pos = 0
        batch = collate(self.enc, self.order[self.pos:self.pos + bs], self.bb.tokenizer.pad_token_id, "seq2seq")
        self.pos += bs
        for g in self.opt.param_groups:
            g["lr"] = self.cfg.train.lr * min(1.0, (self.step_no + 1) / self.cfg.train.warmup_steps)
        loss = self.model(**batch).loss
        self.opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.step_no += 1
        return int(torch.isin(batch["labels"], self.id_tokens).sum())


def throughput(runner, seconds: float) -> float:
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        n += runner.step()
    return n / (time.perf_counter() - start)


def time_to_target(runner, cases, target: float, budget: float, every: float) -> tuple[float | None, list]:
    trained, curve = 0.0, []
    while trained < budget:
        start = time.perf_counter()
        while time.perf_counter() - start < every:
            runner.step()
        trained += time.perf_counter() - start
        value = tt.validate(runner.ranker, cases)["valid/ndcg@10"]
        curve.append((round(trained), round(value, 4)))
        print(f"  {runner.name}: {trained:.0f} s trained, valid NDCG@10 {value:.4f}", flush=True)
        if value >= target:
            return trained, curve
    return None, curve


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--warehouse", required=True, help="a warehouse after learn_identifiers and build_corpus")
    p.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "default.yaml"))
    p.add_argument("--seconds", type=float, default=30.0, help="seconds per throughput round")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--target", type=float, default=0.03, help="valid NDCG@10 (mean of both tasks) to reach")
    p.add_argument("--budget", type=float, default=600.0, help="training seconds each recipe may take to get there")
    p.add_argument("--eval-seconds", type=float, default=60.0)
    p.add_argument("--valid-cases", type=int, default=200)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config, [f"warehouse={args.warehouse}", "tracking.enabled=false"])
    prompted = load_config(args.config, [f"warehouse={args.warehouse}", "tracking.enabled=false",
                                         "model.formulation=prompted", "train.weight_decay=0.01"])
    print(f"threads {torch.get_num_threads()}, warehouse {args.warehouse}")

    runners = [Timeline(cfg), PromptedT5(prompted)]
    rates = {r.name: 0.0 for r in runners}
    for _ in range(args.repeats):
        for r in runners:
            rates[r.name] = max(rates[r.name], throughput(r, args.seconds))
    for name, rate in rates.items():
        print(f"{name:22s} supervised identifier tokens/s {rate:10,.0f}")
    ours, theirs = rates[runners[0].name], rates[runners[1].name]
    print(f"supervised identifier tokens/s, timeline / prompted T5: {ours / theirs:.1f}x")

    cases = tt.valid_cases(cfg, args.valid_cases)
    reached = {}
    for make, c in ((Timeline, cfg), (PromptedT5, prompted)):
        runner = make(c)  # fresh weights: time from scratch
        reached[runner.name], _ = time_to_target(runner, cases, args.target, args.budget, args.eval_seconds)
    t_ours, t_theirs = reached[runners[0].name], reached[runners[1].name]
    for name, t in reached.items():
        print(f"{name:22s} wall time to valid NDCG@10 {args.target}: "
              + (f"{t:.0f} s" if t is not None else f"> {args.budget:.0f} s (not reached)"))
    if t_ours is not None:
        if t_theirs is not None:
            print(f"time to target, prompted T5 / timeline: {t_theirs / t_ours:.1f}x")
        else:
            print(f"time to target, prompted T5 / timeline: > {args.budget / t_ours:.1f}x (a lower bound)")


if __name__ == "__main__":
    main()
