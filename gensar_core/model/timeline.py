"""The timeline formulation: one causal pass over a user's whole interleaved history.

The prompted recipe (corpus.py) writes one prompt per event with the last 5 + 5 events and one
6-token target, so about 4% of the tokens it processes are supervised. Here each user's events,
both behaviours in time order, are written once in the paper's own tokens

    rec click   `<rec_item>` + collaborative ID              (4 tokens after the behaviour token)
    search      `<src_query>` query words `<src_item>` + semantic ID

and a decoder-only model predicts every next token. One pass then trains next recommended item
(the ID after each `<rec_item>`), next searched item (the ID after each `<src_item>`, given the
query) and next query (the words after each `<src_query>`) at every position of the window,
with windows of up to `max_len` tokens (about 80 events) instead of 5 + 5. The loss is on the
identifier tokens, the query words and the `<src_item>` that ends a query; the behaviour tokens
`<rec_item>` / `<src_query>` are given, not predicted (which behaviour comes next is not the
model's job: the caller asks for one).

The tokenizer is word-level: behaviour tokens, identifier tokens and the query words seen in
train, whitespace-separated, so every token of the format is one id and there is no BPE to learn.
With `model.timeline.history_ids` every event also carries the codes of the item's other
identifier that its own lacks (the collaborative suffix after a search's semantic ID, the
semantic suffix after a click's collaborative ID), so recommendation reads every history item by
its collaborative codes and search by its semantic ones; those codes are context, never predicted.
At decoding time a prompt is the user's timeline, then `<rec_item>` (recommendation) or
`<src_query>` query `<src_item>` (search), and constrained beam search writes the ID.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from gensar_core.identifiers.naming import parse_id
from gensar_core.model.prompts import ItemIds
from gensar_core.model.vocab import BEHAVIOUR_TOKENS, REC_ITEM, SRC_ITEM, SRC_QUERY

PAD, BOS, UNK = "<pad>", "<s>", "<unk>"
SPECIAL = (PAD, BOS, UNK)
IGNORE = -100
# what each token of a timeline is, so a task switched off loses its loss but keeps its context
GIVEN, REC_ID, QUERY, SEARCH_ID = 0, 1, 2, 3
TASK_KINDS = {"rec": (REC_ID,), "query": (QUERY,), "search": (SEARCH_ID,)}


def supervised_kinds(tasks: Sequence[str]) -> tuple[int, ...]:
    """The token kinds that get a loss when `tasks` are enabled (rec, search, query)."""
    return tuple(k for t in tasks for k in TASK_KINDS.get(t, ()))


def query_words(query: Optional[str]) -> list[str]:
    return (query or "").lower().split()


def id_tokens(identifier: str) -> list[str]:
    return [f"<{letter}_{code}>" for letter, code in parse_id(identifier)]


def own_codes(identifier: str, beside: Sequence[str]) -> list[str]:
    """The tokens of `identifier` after the prefix it shares with the ID tokens `beside`: the
    collaborative suffix of a semantic ID and the other way round (none for TIGER-style IDs,
    where both are the semantic ID)."""
    tokens = id_tokens(identifier)
    shared = 0
    while shared < min(len(tokens), len(beside)) and tokens[shared] == beside[shared]:
        shared += 1
    return tokens[shared:]


def build_tokenizer(queries: Iterable[Optional[str]], extra_tokens: Sequence[str], min_count: int = 1):
    """A word-level fast tokenizer: specials, behaviour and identifier tokens, then the query
    words of `queries` seen at least `min_count` times (most frequent first)."""
    counts = Counter(w for q in queries for w in query_words(q))
    fixed = list(SPECIAL) + [t for t in BEHAVIOUR_TOKENS] + [t for t in extra_tokens if t not in BEHAVIOUR_TOKENS]
    words = [w for w, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if c >= min_count and w not in fixed]
    vocab = {tok: i for i, tok in enumerate(fixed + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, bos_token=BOS, unk_token=UNK,
                                   eos_token=PAD)


@dataclass
class TimelineCodec:
    """Events -> token ids (and the loss mask), with one tokenizer's vocabulary."""

    vocab: Mapping[str, int]
    item_ids: Mapping[str, ItemIds]
    history_ids: bool = False  # each event also carries its item's other identifier's own codes

    @classmethod
    def of(cls, tokenizer, item_ids: Mapping[str, ItemIds], history_ids: bool = False) -> "TimelineCodec":
        return cls(tokenizer.get_vocab(), item_ids, history_ids)

    def _ids(self, tokens: Sequence[str]) -> list[int]:
        unk = self.vocab[UNK]
        return [self.vocab.get(t, unk) for t in tokens]

    def event(self, behavior: str, item_id: str, query: Optional[str]) -> tuple[list[int], list[int]]:
        """(token ids, token kinds) of one event."""
        ids = self.item_ids[str(item_id)]
        if behavior == "rec":
            code = id_tokens(ids.collaborative_id)
            other = own_codes(ids.semantic_id, code) if self.history_ids else []
            return self._ids([REC_ITEM] + code + other), [GIVEN] + [REC_ID] * len(code) + [GIVEN] * len(other)
        if behavior == "search":
            words, code = query_words(query), id_tokens(ids.semantic_id)
            other = own_codes(ids.collaborative_id, code) if self.history_ids else []
            toks = [SRC_QUERY] + words + [SRC_ITEM] + code + other
            kinds = [GIVEN] + [QUERY] * (len(words) + 1) + [SEARCH_ID] * len(code) + [GIVEN] * len(other)
            return self._ids(toks), kinds
        raise ValueError(f"unknown behaviour {behavior!r}")

    def timeline(self, events: Iterable[Mapping]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A user's events (dicts with behavior, item_id, query), oldest first -> (ids [T] int32,
        kinds [T] int8, event start offsets [E] int64). Events whose item has no ID (newer
        than this model's table) are left out."""
        ids, sup, starts = [], [], []
        for e in events:
            if str(e["item_id"]) not in self.item_ids:
                continue
            tok, flag = self.event(e["behavior"], e["item_id"], e.get("query"))
            starts.append(len(ids))
            ids += tok
            sup += flag
        return np.asarray(ids, dtype=np.int32), np.asarray(sup, dtype=np.int8), np.asarray(starts, dtype=np.int64)

    def prompt(self, events: Iterable[Mapping], task: str, query: Optional[str], max_len: int) -> str:
        """The decoder-only prompt, as text the tokenizer splits back into the same ids: BOS + the
        last events that fit in `max_len` tokens (whole events), then the question: nothing more
        for 'rec' (`<rec_item>` is the decoder's forced prefix), `<src_query>` + query for
        'search' (`<src_item>` is the forced prefix)."""
        return self.prompts(events, task, query, [max_len])[0]

    def prompts(self, events: Iterable[Mapping], task: str, query: Optional[str],
                lengths: Sequence[int]) -> list[str]:
        """`prompt` at each of `lengths`, the timeline written once."""
        full, _, starts = self.timeline(events)
        tail = [SRC_QUERY] + query_words(query) if task == "search" else []
        out = []
        for max_len in lengths:
            ids, room = full, max_len - 1 - len(tail) - 5  # BOS, the question, the forced token and the ID
            if len(ids) > room:
                keep = starts[starts >= len(ids) - room]
                ids = ids[int(keep[0]):] if len(keep) else ids[:0]
            out.append(" ".join([BOS] + [self.words[i] for i in ids.tolist()] + tail))
        return out

    def adhoc(self, query: str, item_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The ad-hoc search task as a short window: BOS `<src_query>` query `<src_item>` + the
        item's semantic ID, with the loss on the ID only (the query is given, no history).
        Returns (input ids, labels, token kinds), as `training_windows` does."""
        ids, kinds = self.event("search", item_id, query)
        window = np.asarray([self.vocab[BOS]] + ids, dtype=np.int64)
        kinds = np.asarray([GIVEN] + kinds, dtype=np.int8)
        labels = np.where(kinds == SEARCH_ID, window, IGNORE)
        return window, labels, kinds

    @property
    def words(self) -> list[str]:
        if not hasattr(self, "_words"):
            self._words = [t for t, _ in sorted(self.vocab.items(), key=lambda kv: kv[1])]
        return self._words


def training_windows(timelines: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], max_len: int,
                     rng: np.random.Generator, kinds: Sequence[int] = (REC_ID, QUERY, SEARCH_ID)
                     ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Windows of at most `max_len` tokens (BOS + whole events) covering each timeline, cut from
    its end with the older cuts shifted by a random offset each epoch, so every event is a target
    once per epoch and window edges move. Returns (input ids, labels, token kinds) triples, labels
    IGNORE but for tokens of the supervised `kinds`; inputs start with BOS."""
    out = []
    for ids, token_kinds, starts in timelines:
        sup = np.isin(token_kinds, kinds)
        if len(ids) == 0:
            continue
        bos = SPECIAL.index(BOS)  # build_tokenizer numbers the specials first
        end = len(ids)
        first = True
        while end > 0:
            room = max_len - 1
            if not first:
                room -= int(rng.integers(0, max(1, room // 2)))
            cut = starts[starts >= end - room]
            begin = int(cut[0]) if len(cut) else int(starts[starts < end][-1])
            window = np.concatenate([[bos], ids[begin:end]]).astype(np.int64)
            labels = np.where(np.concatenate([[False], sup[begin:end]]), window, IGNORE)
            if (labels != IGNORE).any():
                out.append((window, labels, np.concatenate([[GIVEN], token_kinds[begin:end]]).astype(np.int8)))
            end, first = begin, False
    return out


def batches(windows: list[tuple[np.ndarray, ...]], tokens_per_batch: int,
            rng: np.random.Generator) -> list[list[int]]:
    """Indexes of `windows` grouped by similar length (little padding), about `tokens_per_batch`
    padded tokens each, in a shuffled order."""
    lengths = np.asarray([len(w[0]) for w in windows])
    order = np.lexsort((rng.random(len(lengths)), lengths))
    out, cur, width = [], [], 0
    for i in order:
        width_new = max(width, int(lengths[i]))
        if cur and width_new * (len(cur) + 1) > tokens_per_batch:
            out.append(cur)
            cur, width_new = [], int(lengths[i])
        cur.append(int(i))
        width = width_new
    if cur:
        out.append(cur)
    return [out[i] for i in rng.permutation(len(out))]


def kind_weights(rec: float = 1.0, search: float = 1.0, query: float = 1.0,
                 kinds: Sequence[int] = (REC_ID, QUERY, SEARCH_ID)) -> Optional[np.ndarray]:
    """The loss weight of each token kind, indexed by kind (GIVEN, REC_ID, QUERY, SEARCH_ID);
    None when the supervised `kinds` all weigh the same (the plain mean over supervised tokens,
    e.g. a single-task model)."""
    weights = np.zeros(4, dtype=np.float32)
    weights[REC_ID], weights[QUERY], weights[SEARCH_ID] = rec, query, search
    if len({float(weights[k]) for k in kinds}) <= 1:
        return None
    return weights


def padded_shape(rows: int, width: int) -> tuple[int, int]:
    """The batch shape `collate_windows(..., pad_shape=True)` pads (rows, width) up to: rows to a
    multiple of 8, width to a power of two up to 64 and a multiple of 64 above. Length-bucketed
    batches otherwise come in ~60 new shapes every epoch, and on a CPU with native bf16 oneDNN
    keeps kernels and buffers per shape: a default training grew to 5-7 GB (`bench/train_memory.py`)."""
    width = max(8, 1 << (width - 1).bit_length()) if width <= 64 else -(-width // 64) * 64
    return -(-rows // 8) * 8, width


def collate_windows(windows, index: Sequence[int], pad_id: int = 0, weights: Optional[np.ndarray] = None,
                    pad_shape: bool = False):
    """A right-padded batch of `windows[index]`; with `weights` (kind_weights), also each
    position's loss weight, 0 where there is no label. `pad_shape`: pad to `padded_shape` (the
    extra rows and columns are padding: no label, weight 0, after every real token)."""
    rows = [windows[i] for i in index]
    n, width = len(rows), max(len(w) for w, _, _ in rows)
    if pad_shape:
        n, width = padded_shape(n, width)
    ids = np.full((n, width), pad_id, dtype=np.int64)
    labels = np.full((n, width), IGNORE, dtype=np.int64)
    kinds = np.full((n, width), GIVEN, dtype=np.int8)
    mask = np.zeros((n, width), dtype=np.int64)
    for r, (w, lab, kind) in enumerate(rows):
        ids[r, :len(w)], labels[r, :len(w)], kinds[r, :len(w)], mask[r, :len(w)] = w, lab, kind, 1
    batch = {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels),
             "attention_mask": torch.from_numpy(mask)}
    if weights is not None:
        batch["loss_weights"] = torch.from_numpy(np.where(labels != IGNORE, weights[kinds], 0).astype(np.float32))
    return batch
