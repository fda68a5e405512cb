"""Constrained beam search that can only emit valid identifiers (docs/method.md "Decoding"), fast on CPU.

`constrained_beam_search` decodes a batch of inputs x beams together, for encoder-decoder (T5)
and decoder-only (Llama, Qwen, SmolLM) Hugging Face models, and returns each input's top-K items
with their log-probabilities. Masking is not where beam search spends its time; redundant model
work is: `generate` copies the encoder output (seq2seq) or the whole prompt (decoder-only) per
beam, recomputes cross-attention keys per beam, copies every cache per step to reorder it, and
multiplies the full output layer. Here:

- the encoder / the prompt run once per input; cross-attention keys and values too; T5's
  encoder runs its projections and feed-forward on the real tokens only (packed), not on padding;
- an input's beams share one row: each step appends the beams' new tokens to that row's KV cache
  and an attention mask lets a token see only the prompt and its own ancestors (a beam tree), so
  nothing is copied per beam and no cache is reordered (T5 and mT5: `_T5Tree`, which also takes
  T5's relative position bias from tree depths; decoder-only: the model's own forward with a 4D
  mask and explicit positions). Other encoder-decoders (and flash attention) take the plain way,
  one row per beam with the cache reordered by beam index;
- the `PrefixIndex` gives the allowed children of every beam with one gather, one `topk` keeps
  the best `beam_size` candidates per input; no Python loop over beams;
- logits are computed only where needed (see `normalize`). With "prefix", a token that is its
  prefix's only continuation is forced (scores 0) and needs no logits: a level where every prefix
  has one child is skipped, the trailing run of such levels needs no decoder pass, and the last
  pass runs only for the beams that still have a choice (with 1,682 items and 256 codes a level,
  after two tokens few do).

Scores are sums of per-step log-probabilities of the identifier tokens (tokens given in
`prefix_tokens` are forced and not scored). `normalize` says what each step's softmax runs over:

    "prefix" the valid continuations of the beam's prefix (its children in the index): the
             model's distribution conditioned on writing a valid identifier. Only the rows of the
             step's codebook are multiplied; a forced token (one child) scores 0. The default.
    "level"  the tokens step t can ever emit (`index.level_tokens[t]`, at most one codebook).
    "vocab"  the full vocabulary: exactly `generate`'s scores (needs the full output layer).

A trained model puts almost all its mass on valid tokens, so the three rank alike in practice; a
random model's do not.

An ensemble (`model` a sequence of models that share the vocabulary, e.g. one model trained at
several seeds) decodes as one model whose next-token distribution at every step is the mean of
its members' (each normalised as above): every member keeps its own decoder state, the beams are
the ensemble's.

`decode_reference.hf_beam_search` is the reference, the research code's way: `model.generate(num_beams=...,
prefix_allowed_tokens_fn=...)` over a Python dict trie, with logits processors that reproduce
each scoring. Tests and `bench/decode.py` compare the two.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from gensar_core.model.decoder_states import CausalState, Seq2SeqState
from gensar_core.model.output_head import OutputHead
from gensar_core.model.prefix_index import PrefixIndex
from gensar_core.model.t5_tree import T5TreeState

NORMALIZE = ("prefix", "level", "vocab")
PrefixTokens = Optional[Union[Sequence[int], Tensor]]


def prefix_matrix(prefix_tokens: PrefixTokens, users: int, device) -> Tensor:
    if prefix_tokens is None:
        return torch.zeros(users, 0, dtype=torch.long, device=device)
    prefix = torch.as_tensor(prefix_tokens, dtype=torch.long, device=device)
    if prefix.dim() == 1:
        prefix = prefix[None].expand(users, -1)
    if prefix.dim() != 2 or prefix.shape[0] != users:
        raise ValueError(f"prefix_tokens: need [P] or [{users}, P], got shape {tuple(prefix.shape)}")
    return prefix.contiguous()


# ---------------------------------------------------------------- beam search
@torch.inference_mode()
def constrained_beam_search(model: Union[torch.nn.Module, Sequence[torch.nn.Module]],
                            input_ids: Union[Tensor, Sequence[Tensor]],
                            attention_mask: Union[Optional[Tensor], Sequence[Optional[Tensor]]],
                            index: PrefixIndex, beam_size: int, top_k: int,
                            prefix_tokens: PrefixTokens = None, normalize: str = "prefix",
                            banned: Optional[Sequence] = None) -> tuple[Tensor, Tensor]:
    """Top-`top_k` items of each input, by beam search over the valid sequences of `index`.

    model: one model, or the members of an ensemble (their mean next-token distribution is decoded).

    input_ids / attention_mask [B, S]: encoder inputs (seq2seq) or left-padded prompts (decoder-
    only); or one of each per model, the same B inputs written another way (a view of each input:
    an ensemble member may read a shorter prompt). prefix_tokens [P] or [B, P]: tokens forced
    right after the decoder start / the prompt (e.g. the behaviour token `<rec_item>`), not
    scored. banned: per input, the items it must never return (a user's history): no beam is
    spent on them, nor on a prefix with no other item below it (see `allowed_counts`); the scores
    of the other items are the ones an unbanned search gives them. Returns (items [B, K] long,
    scores [B, K] float, best first); an input with fewer than K reachable sequences gets item
    -1, score -inf.
    """
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
    if not 1 <= top_k <= beam_size:
        raise ValueError(f"need 1 <= top_k <= beam_size, got top_k={top_k}, beam_size={beam_size}")
    models = list(model) if isinstance(model, (list, tuple)) else [model]
    views = (list(zip(input_ids, attention_mask, strict=True)) if isinstance(input_ids, (list, tuple))
             else [(input_ids, attention_mask)] * len(models))
    if len(views) != len(models) or len({ids.shape[0] for ids, _ in views}) != 1:
        raise ValueError(f"{len(models)} models need one input batch each, of the same inputs; got "
                         f"{len(views)} of {sorted({ids.shape[0] for ids, _ in views})} rows")
    device = views[0][0].device
    index = index if index.leaf_item.device == device else index.to(device)
    users = views[0][0].shape[0]
    prefix = prefix_matrix(prefix_tokens, users, device)
    allowed = None if banned is None else index.allowed_counts(banned)
    members = [Member(m, index, normalize) for m in models]
    # with "prefix", a level whose every node has one child is forced: no logits; the decoder
    # state is advanced only while a later level still has a choice to score
    scored = [normalize != "prefix" or width > 1 for width in index.width]

    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        hidden = [member.start(ids, mask, prefix) for member, (ids, mask) in zip(members, views)]  # [users * width, d]
        width = 1  # beams kept per input at this level
        nodes = torch.zeros(users, dtype=torch.long, device=device)
        scores = torch.zeros(users, device=device)
        for level in range(index.levels):
            child, valid = index.children(level, nodes)  # [rows, C]
            if not scored[level]:
                logp = torch.zeros(child.shape, device=device)
            else:
                logp = [member.log_probs(h, level, child, valid) for member, h in zip(members, hidden)]
                logp = logp[0] if len(logp) == 1 else torch.logsumexp(torch.stack(logp), 0) - math.log(len(logp))
            if allowed is not None:  # after the softmax: the scores stay those of the unbanned model
                n_rows = child.shape[0]
                valid = valid & (allowed[level + 1].gather(1, child.view(users, -1)).view(n_rows, -1) > 0)
            cand = (scores[:, None] + logp).masked_fill(~valid, float("-inf"))
            n_child = child.shape[1]
            new_width = min(beam_size, index.nodes(level + 1))
            scores, pos = cand.view(users, width * n_child).topk(new_width, dim=1)  # sorted, best first
            nodes = child.view(users, width * n_child).gather(1, pos).view(-1)
            scores = scores.reshape(-1)
            if any(scored[level + 1:]):
                src = (torch.div(pos, n_child, rounding_mode="floor")
                       + torch.arange(users, device=device)[:, None] * width).view(-1)
                need = None
                if normalize == "prefix" and not any(scored[level + 2:]):
                    # the last pass that scores anything: only beams with more than one
                    # continuation need it (with a sparse catalogue, few do); the others score 0
                    need = index.ptr[level + 1][nodes + 1] - index.ptr[level + 1][nodes] > 1
                if need is None or bool(need.any()):
                    tokens = index.token[level][nodes]
                    hidden = [member.state.advance(src, tokens, new_width != width, need) for member in members]
                else:
                    hidden = [h.new_zeros(users * new_width, h.shape[-1]) for h in hidden]
            width = new_width
    finally:
        for m, training in zip(models, was_training):
            m.train(training)

    items = index.items_of(nodes).view(users, width)
    scores = scores.view(users, width)
    if width < top_k:
        items = torch.cat([items, items.new_full((users, top_k - width), -1)], dim=1)
        scores = torch.cat([scores, scores.new_full((users, top_k - width), float("-inf"))], dim=1)
    items, scores = items[:, :top_k].clone(), scores[:, :top_k].clone()
    items[scores == float("-inf")] = -1
    return items, scores


class Member:
    """One model of a beam search: its decoder state and its per-level output rows."""

    def __init__(self, model, index: PrefixIndex, normalize: str):
        self.model, self.index, self.normalize = model, index, normalize
        self.head = OutputHead.of(model)
        self.level_rows = [self.head.rows(t) for t in index.level_tokens] if normalize != "vocab" else None
        self.state = None

    def start(self, input_ids: Tensor, attention_mask: Optional[Tensor], prefix: Tensor) -> Tensor:
        if not self.model.config.is_encoder_decoder:
            kind = CausalState
        else:
            kind = T5TreeState if T5TreeState.supports(self.model) else Seq2SeqState
        self.state = kind(self.model, input_ids, attention_mask, prefix)
        return self.state.start()

    def log_probs(self, hidden: Tensor, level: int, child: Tensor, valid: Tensor) -> Tensor:
        """[rows, C] log-probabilities of each beam's children, normalised as `normalize` says."""
        index = self.index
        if self.normalize == "prefix":
            logits = self.head.apply(hidden, *self.level_rows[level]).gather(1, index.column[level][child])
            return torch.log_softmax(logits.masked_fill(~valid, float("-inf")), dim=-1)
        if self.normalize == "level":
            logp = torch.log_softmax(self.head.apply(hidden, *self.level_rows[level]), dim=-1)
            return logp.gather(1, index.column[level][child])
        return torch.log_softmax(self.head.logits(hidden), dim=-1).gather(1, index.token[level][child])
