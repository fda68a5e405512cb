"""Training precision on this CPU: the timeline model's step in float32 against bf16 autocast, one run.

oneDNN reports bf16 support on any AVX-512 CPU, but only AVX-512 BF16 or AMX compute it in
hardware; elsewhere bf16 is emulated. `train.mixed_precision=auto` takes bf16 only where it is
native (`training.native_cpu_bf16`); this prints tokens per second of the default model's
training step (same weights, same 8,192-token batches) in both precisions, alternating for
`--repeats` rounds of `--seconds` (best round kept, so load from other processes skews the ratio
less), their ratio, and what `auto` picks here.

    python bench/precision.py [--threads 1 --seconds 20]
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from gensar_core.config import PipelineConfig  # noqa: E402
from gensar_core.model import timeline_train as tt  # noqa: E402
from gensar_core.model import training  # noqa: E402
from gensar_core.model.timeline import build_tokenizer  # noqa: E402
from gensar_core.model.vocab import added_tokens  # noqa: E402


def tokens_per_second(model, optimizer, batch: dict, amp, seconds: float) -> float:
    start, tokens = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        tt.train_step(model, optimizer, batch, 1e-4, 1.0, amp)
        tokens += batch["input_ids"].numel()
    return tokens / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=20.0, help="seconds per round and precision")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--vocab-words", type=int, default=2000, help="query words in the vocabulary (the default has ~2k)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = PipelineConfig.model_validate({"identifiers": {"codebook_size": 32}})
    t = cfg.model.timeline
    tokenizer = build_tokenizer([f"w{i}" for i in range(args.vocab_words)], added_tokens(cfg))
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, len(tokenizer), (t.tokens_per_batch // t.max_len, t.max_len), generator=generator)
    batch = {"input_ids": ids, "labels": ids.clone()}
    base = tt.build_model(tokenizer, cfg.model, seed=0).train()
    runs = {}
    for name, amp in (("float32", contextlib.nullcontext),
                      ("bf16 autocast", lambda: torch.autocast("cpu", dtype=torch.bfloat16))):
        model = copy.deepcopy(base)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        tokens_per_second(model, optimizer, batch, amp, 2.0)  # warm-up: oneDNN primitives, allocator
        runs[name] = (model, optimizer, amp)
    rates = {name: 0.0 for name in runs}
    for _ in range(args.repeats):
        for name, (model, optimizer, amp) in runs.items():
            rates[name] = max(rates[name], tokens_per_second(model, optimizer, batch, amp, args.seconds))
    print(f"threads {torch.get_num_threads()}, model d {t.d_model} x {t.num_layers} layers, vocab {len(tokenizer)}, "
          f"batch {tuple(ids.shape)}; native bf16 (AVX-512 BF16 or AMX): {training.native_cpu_bf16()}")
    for name, rate in rates.items():
        print(f"{name:14s} training tokens/s {rate:10,.0f}")
    print(f"bf16 autocast / float32: {rates['bf16 autocast'] / rates['float32']:.2f}x; "
          f"train.mixed_precision=auto picks {'bf16' if training.native_cpu_bf16() else 'float32'} here")


if __name__ == "__main__":
    main()
