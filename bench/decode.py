"""Constrained beam search throughput: ours against HF `generate` + a Python trie, same run.

Both decoders get the same model, the same catalogue of valid identifiers, the same inputs, the
same beam size and top-K:

    ours  gensar_core.model.decode.constrained_beam_search: tensor prefix index, encoder / prompt
          once per input (T5: packed real tokens), beams of an input as a tree in one KV-cache
          row, one topk per step, forced tokens not computed, T5 matmuls through oneDNN
    hf    model.generate(num_beams=..., num_return_sequences=K, prefix_allowed_tokens_fn=...)
          walking a Python dict trie for every beam at every step (the research code's way)

Prints users/second and ms/user of each, the speed-up over `hf`, and how often each returns the
same ranked top-K (up to ties) as `generate` scoring the same way. Ours runs with
normalize="vocab" (generate's own scores, full output layer), "level" (the default: softmax over
the step's codebook rows only) and "prefix" (softmax over the valid continuations only, forced
tokens not computed); `generate` runs with each too, "level" and "prefix" with a logits
processor that renormalises over the same tokens, so every scoring is checked against generate.
With --model (a trained model) it also prints how often the default scoring ranks as generate's
own does. The encoder (or prompt) pass alone is timed too: generate pays it once per input (ours
runs T5's encoder on the real tokens only, packed).
Batches alternate between the decoders, so load from other processes skews the ratio less.

    python bench/decode.py                      # random small T5 (~8.8M), 1,682 items, codebook 256
    python bench/decode.py --kind causal        # random small Llama instead
    python bench/decode.py --model .gensar/warehouse/models/<run> --warehouse .gensar/warehouse [--id semantic]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout

from gensar_core.identifiers.naming import format_id, token_letters, vocabulary  # noqa: E402
from gensar_core.model.decode import constrained_beam_search  # noqa: E402
from gensar_core.model.decode_reference import hf_beam_search, topk_agreement  # noqa: E402
from gensar_core.model.prefix_index import PrefixIndex  # noqa: E402

BEHAVIOUR = ("<rec_item>", "<src_query>", "<src_item>")


def random_model(kind: str, vocab_size: int, args):
    from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

    torch.manual_seed(args.seed)
    if kind == "t5":
        config = T5Config(vocab_size=vocab_size, d_model=args.d_model, d_kv=args.d_model // args.heads,
                          d_ff=args.d_ff, num_layers=args.layers, num_decoder_layers=args.layers,
                          num_heads=args.heads, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
        return T5ForConditionalGeneration(config).eval()
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=args.d_model, intermediate_size=args.d_ff,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, pad_token_id=0, bos_token_id=2, eos_token_id=1,
                         tie_word_embeddings=True, max_position_embeddings=1024)
    return LlamaForCausalLM(config).eval()


def random_identifiers(items: int, levels: int, codebook: int, seed: int) -> torch.Tensor:
    """`items` distinct code paths [items, levels]."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.unique(torch.randint(0, codebook, (items * 2, levels), generator=g), dim=0)
    return codes[torch.randperm(len(codes), generator=g)[:items]]


def random_setup(args):
    """A random model, a random catalogue and random prompts (left-padded, lengths vary)."""
    extra = vocabulary(2, args.levels - 2, args.codebook) + list(BEHAVIOUR)
    table = {tok: args.words + i for i, tok in enumerate(extra)}
    token_id = lambda toks: [table[t] for t in toks]  # noqa: E731
    vocab_size = args.words + len(extra)
    model = random_model(args.kind, vocab_size, args)
    letters = token_letters(2, args.levels - 2)
    letters = letters.semantic_id if args.id == "semantic" else letters.collaborative_id
    codes = random_identifiers(args.items, args.levels, args.codebook, args.seed)
    identifiers = [format_id(c, letters) for c in codes.tolist()]
    index = PrefixIndex.from_identifiers(identifiers, token_id, torch.arange(len(codes)))
    prefix = token_id(["<rec_item>" if args.id == "collaborative" else "<src_item>"])
    g = torch.Generator().manual_seed(args.seed + 1)
    batches = []
    for _ in range(args.batches + 1):  # the first one warms both up
        ids = torch.randint(3, vocab_size, (args.batch, args.prompt_len), generator=g)
        mask = torch.ones_like(ids)
        lengths = torch.randint(args.prompt_len // 2, args.prompt_len + 1, (args.batch,), generator=g)
        for row, n in enumerate(lengths.tolist()):  # left padding: fine for both model kinds
            mask[row, : args.prompt_len - n] = 0
            ids[row, : args.prompt_len - n] = 0
        batches.append((ids, mask))
    return model, index, prefix, batches


def trained_setup(args):
    """A trained model folder and its warehouse: the real catalogue and real prompts, the test
    split's cases of the task (`--id collaborative`: recommendation, `semantic`: search) written
    as evaluation writes them."""
    from gensar_core.model.generative_ranker import DecodeSettings, GenerativeRanker
    from gensar_core.storage import Warehouse

    if not args.warehouse:
        raise SystemExit("--model needs --warehouse (the warehouse whose identifiers it was trained on)")
    wh = Warehouse(args.warehouse)
    # only its prompts and prefix index are used; the runs below decode with each scoring
    ranker = GenerativeRanker(args.model, wh.read("identifiers/items"),
                              DecodeSettings(beam_size=args.beam, normalize="level"))
    task = "rec" if args.id == "collaborative" else "search"
    cases = wh.read("splits/test")
    cases = cases[cases["behavior"] == task].head(args.batch * (args.batches + 1))
    prompts = ranker.prompts(cases, task)
    batches = [ranker.encode(prompts[i:i + args.batch]) for i in range(0, len(prompts), args.batch)]
    return ranker.model, ranker.index[task], ranker.prefix[task], batches[: args.batches + 1]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", choices=["t5", "causal"], default="t5", help="random model kind")
    ap.add_argument("--model", default=None, help="a trained model folder (models/<run> of a warehouse)")
    ap.add_argument("--warehouse", default=None, help="with --model: its warehouse (identifiers, test cases)")
    ap.add_argument("--id", choices=["semantic", "collaborative"], default="collaborative")
    ap.add_argument("--items", type=int, default=1682)
    ap.add_argument("--levels", type=int, default=4)
    ap.add_argument("--codebook", type=int, default=256)
    ap.add_argument("--words", type=int, default=4000, help="word tokens of the random model's vocabulary")
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--d-ff", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--beam", type=int, default=40, help="beam width (the default of evaluate.beam_size)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=2025)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model, index, prefix, batches = trained_setup(args) if args.model else random_setup(args)
    vocab_size = model.get_output_embeddings().weight.shape[0]

    params = sum(p.numel() for p in model.parameters())
    print(f"model: {type(model).__name__} {params / 1e6:.1f}M params, vocab {vocab_size}; catalogue "
          f"{index.nodes(index.levels)} items x {index.levels} levels (widths {index.width}); "
          f"beam {args.beam}, top-{args.top_k}, batch {args.batch}, {args.batches} batches, "
          f"prompt <= {max(ids.shape[1] for ids, _ in batches)}, threads {torch.get_num_threads()}")

    # "hf" is the research code's way and the speed baseline; "hf/level" and "hf/prefix" are
    # generate renormalised as ours' scorings are, the references ours/level and ours/prefix must match
    runs = {"hf": lambda i, m: hf_beam_search(model, i, m, index, args.beam, args.top_k, prefix, "vocab")}
    for s in ("level", "prefix"):
        runs[f"hf/{s}"] = lambda i, m, s=s: hf_beam_search(model, i, m, index, args.beam, args.top_k, prefix, s)
    for s in ("vocab", "level", "prefix"):
        runs[f"ours/{s}"] = lambda i, m, s=s: constrained_beam_search(model, i, m, index, args.beam, args.top_k,
                                                                     prefix, s)
    reference = {"hf": "hf", "hf/level": "hf/level", "hf/prefix": "hf/prefix", "ours/vocab": "hf",
                 "ours/level": "hf/level", "ours/prefix": "hf/prefix"}
    if model.config.is_encoder_decoder:  # the one pass both decoders must make: a floor for either
        runs["prompt pass"] = lambda i, m: model.get_encoder()(input_ids=i, attention_mask=m)
    else:
        runs["prompt pass"] = lambda i, m: model.base_model(input_ids=i, attention_mask=m)
    seconds = {name: 0.0 for name in runs}
    results = {name: [] for name in runs}
    with torch.inference_mode():
        for b, (ids, mask) in enumerate(batches):
            for name, run in runs.items():
                t0 = time.perf_counter()
                out = run(ids, mask)
                if b:  # batch 0 is the warm-up
                    seconds[name] += time.perf_counter() - t0
                    results[name].append(out)

    users = args.batch * args.batches
    merged = {name: tuple(torch.cat(x) for x in zip(*results[name])) for name in reference}

    def agreement(name: str, ref: str) -> tuple[float, float]:
        (items, _), (ref_items, ref_scores) = merged[name], merged[ref]
        same = topk_agreement(items, ref_items, ref_scores, tol=1e-3).float().mean().item()
        overlap = sum(len(set(a) & set(h)) for a, h in zip(items.tolist(), ref_items.tolist())) / ref_items.numel()
        return same, overlap

    report = {}
    print(f"{'decoder':12s} {'users/s':>8s} {'ms/user':>8s} {'vs hf':>7s} {'reference':>10s} {'same top-K':>11s} "
          f"{'set overlap':>12s}")
    for name, ref in reference.items():
        same, overlap = agreement(name, ref)
        report[name] = {"users_per_s": users / seconds[name], "ms_per_user": 1000 * seconds[name] / users,
                        "speedup": seconds["hf"] / seconds[name], "reference": ref, "same_topk": same,
                        "overlap": overlap}
        r = report[name]
        print(f"{name:12s} {r['users_per_s']:8.1f} {r['ms_per_user']:8.2f} {r['speedup']:6.1f}x {ref:>10s} "
              f"{same:11.1%} {overlap:12.1%}")
    floor = 1000 * seconds["prompt pass"] / users
    print(f"{'prompt pass':12s} {users / seconds['prompt pass']:8.1f} {floor:8.2f}   (the HF encoder / prompt "
          f"forward alone, padded, once per input: generate pays it; ours packs T5's real tokens)")
    exact, default, fast = report["ours/vocab"], report["ours/level"], report["ours/prefix"]
    print(f"speed-up over generate + trie (hf): x{default['speedup']:.1f} with the default scoring, level (same "
          f"ranked top-{args.top_k} as generate scoring the same way: {default['same_topk']:.1%}), "
          f"x{fast['speedup']:.1f} with prefix (same: {fast['same_topk']:.1%}), x{exact['speedup']:.1f} "
          f"with generate's own scores (same: {exact['same_topk']:.1%})")
    if args.model:  # a trained model: does the default scoring rank as generate's own does?
        same, overlap = agreement("ours/level", "hf")
        print(f"ours/level against hf (generate's own scores): same ranked top-{args.top_k} {same:.1%}, "
              f"set overlap {overlap:.1%}")
    return report


if __name__ == "__main__":
    main()
