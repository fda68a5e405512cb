"""The reference decoder tests and `bench/decode.py` compare `constrained_beam_search` with:
`model.generate` over a Python dict trie, as research code does, and the ranked-list comparison."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import PrefixConstrainedLogitsProcessor

from gensar_core.model.decode import NORMALIZE, PrefixTokens, prefix_matrix
from gensar_core.model.prefix_index import PrefixIndex


@torch.inference_mode()
def hf_beam_search(model, input_ids: Tensor, attention_mask: Optional[Tensor], index: PrefixIndex,
                   beam_size: int, top_k: int, prefix_tokens: PrefixTokens = None,
                   normalize: str = "vocab") -> tuple[Tensor, Tensor]:
    """The research code's decoding, same contract as `constrained_beam_search`.

    `model.generate` with beam search and `prefix_allowed_tokens_fn` walking a Python dict trie
    for every beam at every step (length_penalty 0, so scores are plain sums of log-probs). With
    normalize="level" a logits processor renormalises each step over `index.level_tokens[t]`
    before the trie mask, with normalize="prefix" another one renormalises over the allowed
    tokens after it, which give `constrained_beam_search`'s "level" and "prefix" scores.
    """
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
    if not 1 <= top_k <= beam_size:
        raise ValueError(f"need 1 <= top_k <= beam_size, got top_k={top_k}, beam_size={beam_size}")
    users = input_ids.shape[0]
    prefix = prefix_matrix(prefix_tokens, users, input_ids.device)
    config = model.config
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    kwargs = {}
    if config.is_encoder_decoder:
        start = config.decoder_start_token_id if config.decoder_start_token_id is not None else config.pad_token_id
        kwargs["decoder_input_ids"] = torch.cat(
            [torch.full((users, 1), int(start), dtype=torch.long, device=input_ids.device), prefix], dim=1)
        skip = 1 + prefix.shape[1]
    else:
        input_ids = torch.cat([input_ids, prefix], dim=1)
        attention_mask = torch.cat([attention_mask, torch.ones_like(prefix)], dim=1)
        skip = input_ids.shape[1]

    trie = index.trie()
    dead_end = [int(index.level_tokens[0][0])]  # for beams already at -inf; any token does

    def allowed(batch_id: int, sent: Tensor) -> list[int]:
        node = trie
        for tok in sent[skip:].tolist():
            node = node.get(tok) if isinstance(node, dict) else None
            if node is None:
                return dead_end
        return list(node.keys()) if isinstance(node, dict) else dead_end

    processors = LogitsProcessorList()
    if normalize == "level":
        class LevelNormalise(LogitsProcessor):
            def __call__(self, ids, scores):
                level = min(ids.shape[1] - skip, index.levels - 1)
                cols = index.level_tokens[level].to(scores.device)
                return scores - scores.index_select(1, cols).logsumexp(-1, keepdim=True)

        processors.append(LevelNormalise())
        processors.append(PrefixConstrainedLogitsProcessor(allowed, beam_size))
        constraint = {}
    elif normalize == "prefix":
        class AllowedNormalise(LogitsProcessor):
            def __call__(self, ids, scores):
                return scores.log_softmax(dim=-1)

        processors.append(PrefixConstrainedLogitsProcessor(allowed, beam_size))
        processors.append(AllowedNormalise())
        constraint = {}
    else:
        constraint = {"prefix_allowed_tokens_fn": allowed}

    was_training = model.training
    model.eval()
    try:
        out = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, num_beams=beam_size, num_return_sequences=top_k,
            max_new_tokens=index.levels, do_sample=False, length_penalty=0.0, early_stopping=True,
            return_dict_in_generate=True, output_scores=True, logits_processor=processors,
            pad_token_id=config.pad_token_id if config.pad_token_id is not None else 0, **constraint, **kwargs)
    finally:
        model.train(was_training)
    leaf = {tuple(seq): item for seq, item in zip(index.sequences.tolist(), index.leaf_item.tolist())}
    gen = out.sequences[:, -index.levels:].tolist()
    items = torch.tensor([leaf.get(tuple(seq), -1) for seq in gen], dtype=torch.long).view(users, top_k)
    scores = out.sequences_scores.float().view(users, top_k).cpu()
    items[scores < -1e8] = -1  # beams that never had a valid continuation
    return items, scores


def topk_agreement(items: Tensor, ref_items: Tensor, ref_scores: Tensor, tol: float = 1e-4) -> Tensor:
    """Per input: is `items` the same ranked list as the reference, up to ties (bool [B])?

    At each rank the item must be the reference's, or tie with it: the reference holds it at a
    rank whose score is within `tol` of this rank's score, or this rank's score is within `tol`
    of the K-th (a tie at the cut decides which item gets in). Scores are compared separately.
    """
    ok = torch.ones(items.shape[0], dtype=torch.bool)
    for row in range(items.shape[0]):
        ref, score = ref_items[row].tolist(), ref_scores[row]
        for rank, item in enumerate(items[row].tolist()):
            if item == ref[rank] or abs(float(score[rank] - score[-1])) <= tol:
                continue
            if item not in ref or abs(float(score[ref.index(item)] - score[rank])) > tol:
                ok[row] = False
                break
    return ok
