"""Token ids for training and decoding, the same for every backbone of a kind.

seq2seq: encoder input = prompt (with the tokenizer's special tokens, e.g. T5's `</s>`);
         labels = target + eos.
causal:  input = prompt (with the tokenizer's BOS if it adds one) + target + eos;
         labels = -100 over the prompt (it is not learnt), then target + eos.

Prompts longer than `max_input` keep their last tokens (the most recent history and the question;
a leading BOS is kept); targets longer than `max_target` are cut before the eos. Decoders build
their prompts with `encode_prompts` so they see exactly what training saw.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

IGNORE = -100


@dataclass
class Encoded:
    """Token ids per example, as int32 arrays (a list of Python ints per example would take ~10x the memory)."""

    input_ids: list[np.ndarray]
    labels: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.input_ids)


def _keep_tail(ids: list[int], n: int, bos: int | None) -> list[int]:
    if len(ids) <= n:
        return ids
    if bos is not None and ids and ids[0] == bos:
        return [bos] + ids[len(ids) - (n - 1):]
    return ids[len(ids) - n:]


def encode_prompts(tokenizer, kind: str, texts: Sequence[str], max_input: int) -> list[list[int]]:
    """Prompt ids as the model sees them before the target (causal: generation starts after)."""
    ids = tokenizer(list(texts), add_special_tokens=True)["input_ids"]
    bos = tokenizer.bos_token_id if kind == "causal" else None
    return [_keep_tail(list(x), max_input, bos) for x in ids]


def encode_targets(tokenizer, texts: Sequence[str], max_target: int) -> list[list[int]]:
    eos = tokenizer.eos_token_id
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [list(x)[: max_target - 1] + [eos] for x in ids]


def encode_examples(tokenizer, kind: str, inputs: Sequence[str], targets: Sequence[str],
                    max_input: int, max_target: int, chunk: int = 8192) -> Encoded:
    """Training examples: (input ids, labels) per example; see the module docstring."""
    if len(inputs) != len(targets):
        raise ValueError(f"{len(inputs)} inputs for {len(targets)} targets")
    out = Encoded([], [])
    for start in range(0, len(inputs), chunk):  # bounded peak memory on big corpora
        prompts = encode_prompts(tokenizer, kind, inputs[start: start + chunk], max_input)
        tgt = encode_targets(tokenizer, targets[start: start + chunk], max_target)
        for p, t in zip(prompts, tgt):
            if kind == "seq2seq":
                out.input_ids.append(np.asarray(p, dtype=np.int32))
                out.labels.append(np.asarray(t, dtype=np.int32))
            else:
                out.input_ids.append(np.asarray(p + t, dtype=np.int32))
                out.labels.append(np.asarray([IGNORE] * len(p) + t, dtype=np.int32))
    return out


def collate(enc: Encoded, index: Sequence[int], pad_id: int, kind: str) -> dict[str, torch.Tensor]:
    """A right-padded batch of the examples at `index`."""
    rows = [enc.input_ids[i] for i in index]
    labels = [enc.labels[i] for i in index]
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for j, r in enumerate(rows):
        ids[j, : len(r)] = r
        mask[j, : len(r)] = 1
    lwidth = max(len(r) for r in labels)
    lab = np.full((len(rows), lwidth), IGNORE, dtype=np.int64)
    for j, r in enumerate(labels):
        lab[j, : len(r)] = r
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
            "labels": torch.from_numpy(lab)}


def n_target_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"] != IGNORE).sum())
