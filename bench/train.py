"""Training throughput of the default backbone (scratch T5) against SmolLM2-135M, in one run.

Both train on the same corpus examples (a toy warehouse, or `--warehouse` with a built corpus),
in the same order, with the same batch size, the same loop pieces as `run_train` (the backbone
with the GenSAR vocabulary, `encode_examples`, `collate`, AdamW, gradient clipping), on the same
device. Tokens are counted as `run_train` counts them: encoder + decoder tokens for the seq2seq
T5, sequence tokens (prompt + target) for the decoder-only SmolLM2; padding is not counted.
Since the two tokenizers cut the same text into different numbers of tokens, examples/s is
printed too: it is the like-for-like number.

Each backbone runs `--warmup` untimed steps, then `--steps` timed ones; the two alternate for
`--repeats` rounds and the fastest round of each is kept, so load from other processes on a
shared machine skews the ratio less. SmolLM2 is converted from its GGUF file on first use
(about 30 s, cached under $GENSAR_HOME/models).

    python bench/train.py [--batch-size 8 --steps 3 --warmup 1 --repeats 2 --threads 1 --device cpu]
    python bench/train.py --backbones t5-scratch --device cuda --batch-size 64 --steps 50
    python bench/train.py --warehouse .gensar/warehouse     # a real corpus (after build_corpus)
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from gensar_core.config import PipelineConfig  # noqa: E402
from gensar_core.model.backbone import load_backbone  # noqa: E402
from gensar_core.model.corpus import read_corpus, run_build_corpus  # noqa: E402
from gensar_core.model.data import collate, encode_examples  # noqa: E402
from gensar_core.model.synthetic import write_toy_warehouse  # noqa: E402


def make_config(warehouse: Path, backbone: str, args) -> PipelineConfig:
    tree = {"warehouse": str(warehouse), "seed": 0, "model": {"backbone": backbone}}
    if args.codebook_size:
        tree["identifiers"] = {"codebook_size": args.codebook_size}
    return PipelineConfig.model_validate(tree)


class Runner:
    """One backbone, its encoded examples and optimizer: `steps(n)` trains n steps, returns (s, tokens)."""

    def __init__(self, cfg: PipelineConfig, df, device: torch.device):
        texts = list(df["input_text"]) + list(df["target_text"])
        self.bb = load_backbone(cfg, corpus_texts=texts, seed=0)
        self.model = self.bb.model.to(device).train()
        self.device = device
        self.enc = encode_examples(self.bb.tokenizer, self.bb.kind, df["input_text"].tolist(),
                                   df["target_text"].tolist(), cfg.model.max_input_length, cfg.model.max_target_length)
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-4)
        self.params = sum(p.numel() for p in self.model.parameters())
        self.cursor = 0

    def steps(self, n: int, batch_size: int) -> tuple[float, int, int]:
        pad = self.bb.tokenizer.pad_token_id
        tokens = examples = 0
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            idx = [(self.cursor + i) % len(self.enc) for i in range(batch_size)]
            self.cursor += batch_size
            batch = {k: v.to(self.device) for k, v in collate(self.enc, idx, pad, self.bb.kind).items()}
            tokens += int(batch["attention_mask"].sum())
            if self.bb.kind == "seq2seq":
                tokens += int((batch["labels"] != -100).sum())
            examples += len(idx)
            loss = self.model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, tokens, examples


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--warehouse", default=None, help="a warehouse with corpus/ (default: a toy one in a temp dir)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    ap.add_argument("--codebook-size", type=int, default=None, help="identifier codebook (toy default 32)")
    ap.add_argument("--examples", type=int, default=512, help="corpus examples cycled through")
    ap.add_argument("--backbones", default="t5-scratch,smollm2", help="comma-separated: t5-scratch, smollm2")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    tmp = None
    if args.warehouse:
        root = Path(args.warehouse)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="gensar-bench-train-")
        root = Path(tmp.name) / "warehouse"
        args.codebook_size = args.codebook_size or 32
        write_toy_warehouse(root, n_users=200, n_items=300, events_per_user=20, codebook_size=args.codebook_size,
                            n_genres=8, seed=0)
        run_build_corpus(make_config(root, "t5-scratch", args))
    corpus, _ = read_corpus(make_config(root, "t5-scratch", args))
    train = corpus[corpus["split"] == "train"]
    df = train.sample(n=min(args.examples, len(train)), random_state=0).reset_index(drop=True)

    print(f"device {device}, torch threads {torch.get_num_threads()}, batch {args.batch_size}, "
          f"{args.steps} timed steps x {args.repeats} rounds, {len(df)} examples from {root}")
    runners = {}
    names = {"t5-scratch": "t5-scratch (default)", "smollm2": "smollm2-135m"}
    for backbone in args.backbones.split(","):
        name = names[backbone.strip()]
        t0 = time.perf_counter()
        runners[name] = Runner(make_config(root, backbone.strip(), args), df, device)
        print(f"  loaded {name}: {runners[name].params / 1e6:.1f} M parameters, "
              f"kind {runners[name].bb.kind}, {time.perf_counter() - t0:.1f} s")
    best = {name: None for name in runners}
    for r in range(args.repeats):
        for name, runner in runners.items():
            runner.steps(args.warmup, args.batch_size)
            seconds, tokens, examples = runner.steps(args.steps, args.batch_size)
            rate = (tokens / seconds, examples / seconds, seconds / args.steps, tokens / examples)
            print(f"  round {r + 1} {name:22s} {rate[0]:10.0f} tokens/s {rate[1]:8.1f} examples/s "
                  f"{rate[2]:7.3f} s/step")
            if best[name] is None or rate[0] > best[name][0]:
                best[name] = rate
    print("\nbest round of each:")
    for name, rate in best.items():
        print(f"  {name:22s} {rate[0]:10.0f} tokens/s {rate[1]:8.1f} examples/s "
              f"({rate[3]:.0f} tokens/example, {runners[name].params / 1e6:.1f} M parameters)")
    out = {f"{name.split()[0]}_tokens_per_s": rate[0] for name, rate in best.items()}
    out.update({f"{name.split()[0]}_examples_per_s": rate[1] for name, rate in best.items()})
    if len(best) == 2:
        t5, smol = best["t5-scratch (default)"], best["smollm2-135m"]
        print(f"ratio default / smollm2: {t5[0] / smol[0]:.1f}x tokens/s, {t5[1] / smol[1]:.1f}x examples/s")
        out.update(ratio_tokens=t5[0] / smol[0], ratio_examples=t5[1] / smol[1])
    if tmp is not None:
        tmp.cleanup()
    return out


if __name__ == "__main__":
    main()
