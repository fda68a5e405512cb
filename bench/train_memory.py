"""Training memory of the timeline model: length-bucketed batches as they come (a new shape almost
every step) against batches padded to few shapes (`model.timeline.pad_batch_shape`), one run.

On a CPU with native bf16 (AVX-512 BF16 or AMX) oneDNN keeps kernels and buffers per input
shape, so a training's memory grows with every new shape. Each mode trains the default model
(`train.mixed_precision=auto`) for `--steps` optimizer steps in a fresh process, on windows with
the default corpus's length mix (a third ad-hoc windows of ~10 tokens, the rest 30-512) re-cut
and re-batched every epoch with the real `batches`; it prints the resident memory after the
warm-up and at the end, real (unpadded) tokens per second, and the ratios padded / as-they-come.

    python bench/train_memory.py [--steps 300 --threads 1]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from gensar_core.config import PipelineConfig  # noqa: E402
from gensar_core.model import timeline_train as tt  # noqa: E402
from gensar_core.model import training  # noqa: E402
from gensar_core.model.timeline import IGNORE, batches, build_tokenizer, collate_windows  # noqa: E402
from gensar_core.model.vocab import added_tokens  # noqa: E402

WARMUP = 20


def rss_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def synthetic_windows(rng: np.random.Generator, vocab: int, max_len: int, n: int = 3500) -> list:
    lengths = np.where(rng.random(n) < 0.35, rng.integers(8, 13, n), rng.integers(30, max_len + 1, n))
    out = []
    for length in lengths:
        ids = rng.integers(3, vocab, length)
        labels = np.where(rng.random(length) < 0.4, ids, IGNORE)
        out.append((ids, labels, np.zeros(length, dtype=np.int8)))
    return out


def train(pad: bool, steps: int) -> dict:
    cfg = PipelineConfig.model_validate({"identifiers": {"codebook_size": 32}})
    t = cfg.model.timeline
    tokenizer = build_tokenizer([f"w{i}" for i in range(2000)], added_tokens(cfg))
    model = tt.build_model(tokenizer, cfg.model, seed=0).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    amp = lambda: training.autocast(torch.device("cpu"), training.amp_dtype(torch.device("cpu"), "auto"))  # noqa: E731
    rng = np.random.default_rng(0)
    queue, windows, real, start, after_warmup, shapes = [], [], 0, 0.0, 0.0, set()
    for step in range(steps):
        if not queue:
            windows = synthetic_windows(rng, len(tokenizer), t.max_len)
            queue = batches(windows, t.tokens_per_batch, rng)
        index = queue.pop()
        batch = collate_windows(windows, index, tokenizer.pad_token_id, pad_shape=pad)
        shapes.add(tuple(batch["input_ids"].shape))
        tt.train_step(model, optimizer, batch, 1e-4, 1.0, amp)
        if step == WARMUP - 1:
            start, after_warmup = time.perf_counter(), rss_mib()
        elif step >= WARMUP:
            real += sum(len(windows[i][0]) for i in index)
    return {"rss_warm_mib": after_warmup, "rss_end_mib": rss_mib(), "shapes": len(shapes),
            "real_tokens_per_s": real / (time.perf_counter() - start)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--mode", choices=["tight", "padded"], help=argparse.SUPPRESS)  # one child process
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.mode:
        print(json.dumps(train(args.mode == "padded", args.steps)))
        return
    runs = {}
    for mode in ("tight", "padded"):
        out = subprocess.run([sys.executable, __file__, "--mode", mode, "--steps", str(args.steps),
                              "--threads", str(args.threads)], check=True, capture_output=True, text=True)
        runs[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"threads {args.threads}, {args.steps} steps, native bf16 (AVX-512 BF16 or AMX): {training.native_cpu_bf16()} "
          f"(autocast {'bf16' if training.native_cpu_bf16() else 'off'})")
    for mode, r in runs.items():
        print(f"{mode:7s} shapes {r['shapes']:4d}  RSS after {WARMUP} steps {r['rss_warm_mib']:7.0f} MiB, "
              f"at the end {r['rss_end_mib']:7.0f} MiB (+{r['rss_end_mib'] - r['rss_warm_mib']:.0f})  "
              f"real tokens/s {r['real_tokens_per_s']:8,.0f}")
    tight, padded = runs["tight"], runs["padded"]
    print(f"padded / tight: end RSS {padded['rss_end_mib'] / tight['rss_end_mib']:.2f}x, "
          f"real tokens/s {padded['real_tokens_per_s'] / tight['real_tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()
