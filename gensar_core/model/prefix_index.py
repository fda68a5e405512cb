"""Prefix index of the valid identifiers, held as tensors, for constrained decoding.

The valid identifiers are N token-id sequences of one length L (the ID tokens, optionally
preceded by fixed tokens such as `<rec_item>`). They form a trie of depth L. Level t of the trie
holds the distinct prefixes of length t (level 0: the empty prefix, one root node). Nodes of each
level are numbered in lexicographic order, so the children of a node are a contiguous range of
the next level, which gives a CSR layout per level:

    ptr[t]     [n_t + 1]   children of level-t node p are level-(t+1) nodes ptr[t][p] .. ptr[t][p+1]-1
    token[t]   [n_{t+1}]   the vocabulary token that leads to each level-(t+1) node
    column[t]  [n_{t+1}]   that token's column in level_tokens[t]
    level_tokens[t] [S_t]  the distinct tokens at position t, sorted (what step t can ever emit)
    leaf_item  [n_L]       the item of each complete sequence

For a batch of beams at level t (node ids [M]), `children` returns the allowed continuations as a
padded [M, width[t]] table with one gather, no Python per beam. `trie()` gives the same index as
nested dicts, the research code's structure, for the reference decoder.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence, Union

import torch
from torch import Tensor

from gensar_core.identifiers.naming import parse_id

TokenIds = Union[Mapping[str, int], Callable[[list], list], object]


@dataclass(frozen=True)
class PrefixIndex:
    ptr: tuple[Tensor, ...]
    token: tuple[Tensor, ...]
    column: tuple[Tensor, ...]
    level_tokens: tuple[Tensor, ...]
    width: tuple[int, ...]
    leaf_item: Tensor
    sequences: Tensor  # [n_L, L], sorted; row i is leaf i

    # ------------------------------------------------------------------ building
    @classmethod
    def from_sequences(cls, sequences, item_ids=None) -> "PrefixIndex":
        """Index of `sequences` [N, L] (token ids); `item_ids` [N] (default 0..N-1) name their items.

        Raises ValueError on an empty set or on a sequence given twice (an ID names one item).
        """
        seqs = torch.as_tensor(sequences, dtype=torch.long).cpu()
        if seqs.dim() != 2 or seqs.shape[0] == 0 or seqs.shape[1] == 0:
            raise ValueError(f"need a non-empty [N, L] set of sequences, got shape {tuple(seqs.shape)}")
        n, levels = seqs.shape
        items = torch.arange(n) if item_ids is None else torch.as_tensor(item_ids, dtype=torch.long).cpu()
        if items.shape != (n,):
            raise ValueError(f"{items.numel()} item ids for {n} sequences")

        order = torch.arange(n)  # lexicographic sort: stable sorts from the last column to the first
        for t in reversed(range(levels)):
            order = order[torch.sort(seqs[order, t], stable=True).indices]
        seqs, items = seqs[order], items[order]

        new = torch.zeros(n, dtype=torch.bool)  # row starts a new level-t node
        new[0] = True
        node = torch.zeros(n, dtype=torch.long)  # level-t node of each row; level 0: the root
        ptr, token, column, level_tokens, width = [], [], [], [], []
        for t in range(levels):
            col = seqs[:, t]
            new = new | torch.cat([torch.ones(1, dtype=torch.bool), col[1:] != col[:-1]])
            first = new.nonzero().squeeze(1)  # first row of each level-(t+1) node
            parent = node[first]
            counts = torch.bincount(parent, minlength=int(node[-1]) + 1)
            ptr.append(torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]))
            tok = col[first]
            vocab = torch.unique(col)
            token.append(tok)
            level_tokens.append(vocab)
            column.append(torch.searchsorted(vocab, tok))
            width.append(int(counts.max()))
            node = new.long().cumsum(0) - 1
        if int(node[-1]) + 1 != n:
            raise ValueError(f"{n - int(node[-1]) - 1} duplicate sequences: an identifier must name one item")
        return cls(tuple(ptr), tuple(token), tuple(column), tuple(level_tokens), tuple(width), items, seqs)

    @classmethod
    def from_identifiers(cls, identifiers: Sequence[str], token_ids: TokenIds, item_ids=None,
                         prefix: Sequence[str] = ()) -> "PrefixIndex":
        """Index of ID strings `<a_3><b_7><s_1><t_0>`, each optionally preceded by `prefix` tokens.

        `token_ids` turns token strings into vocabulary ids: a tokenizer (`convert_tokens_to_ids`),
        a mapping, or a function of a list of strings.
        """
        if hasattr(token_ids, "convert_tokens_to_ids"):
            convert = token_ids.convert_tokens_to_ids
        elif isinstance(token_ids, Mapping):
            convert = lambda toks: [token_ids[t] for t in toks]  # noqa: E731
        else:
            convert = token_ids
        rows = []
        for identifier in identifiers:
            toks = list(prefix) + [f"<{letter}_{code}>" for letter, code in parse_id(identifier)]
            ids = convert(toks)
            if any(i is None for i in ids):
                raise ValueError(f"{identifier!r}: a token is not in the vocabulary")
            rows.append(ids)
        lengths = {len(r) for r in rows}
        if len(lengths) > 1:
            raise ValueError(f"identifiers of different lengths {sorted(lengths)}")
        return cls.from_sequences(torch.tensor(rows, dtype=torch.long), item_ids)

    # ------------------------------------------------------------------ queries
    @property
    def levels(self) -> int:
        return len(self.ptr)

    def nodes(self, level: int) -> int:
        """Number of distinct prefixes of length `level` (level 0: 1, level L: the items)."""
        return 1 if level == 0 else self.token[level - 1].numel()

    def children(self, level: int, nodes: Tensor) -> tuple[Tensor, Tensor]:
        """Children of level-`level` nodes [M]: (child node ids [M, W], valid [M, W]), W = width[level].

        Padding slots hold a real node id (so gathers stay in range) and valid False.
        """
        ptr = self.ptr[level]
        start = ptr[nodes]
        count = ptr[nodes + 1] - start
        slot = torch.arange(self.width[level], device=nodes.device)
        valid = slot < count[:, None]
        child = torch.where(valid, start[:, None] + slot, start[:, None])
        return child, valid

    def allowed_counts(self, banned: Sequence) -> list[Tensor]:
        """Per input, how many items outside its `banned` items lie below each node: a list over
        levels 0..L of [B, nodes(level)] int32 (level L: 1 for an allowed leaf, 0 for a banned
        one). Banned items absent from the index are ignored. Built bottom-up with one
        `index_add` per level, no Python per node."""
        device = self.leaf_item.device
        n_leaves = self.leaf_item.numel()
        leaf_of = torch.full((int(self.leaf_item.max()) + 1,), -1, dtype=torch.long, device=device)
        leaf_of[self.leaf_item] = torch.arange(n_leaves, device=device)
        counts = torch.ones(len(banned), n_leaves, dtype=torch.int32, device=device)
        for row, items in enumerate(banned):
            items = torch.as_tensor(items, dtype=torch.long, device=device).reshape(-1)
            items = items[(items >= 0) & (items < leaf_of.numel())]
            leaves = leaf_of[items]
            counts[row, leaves[leaves >= 0]] = 0
        out = [counts]
        for level in reversed(range(self.levels)):
            ptr = self.ptr[level]
            parent = torch.repeat_interleave(torch.arange(ptr.numel() - 1, device=device), ptr.diff())
            up = counts.new_zeros(len(banned), ptr.numel() - 1)
            counts = up.index_add_(1, parent, counts)
            out.append(counts)
        return out[::-1]

    def items_of(self, leaves: Tensor) -> Tensor:
        return self.leaf_item[leaves]

    def to(self, device) -> "PrefixIndex":
        move = lambda ts: tuple(t.to(device) for t in ts)  # noqa: E731
        return PrefixIndex(move(self.ptr), move(self.token), move(self.column), move(self.level_tokens),
                           self.width, self.leaf_item.to(device), self.sequences.to(device))

    def trie(self) -> dict:
        """The same index as nested dicts {token: {token: ... {token: item}}} (research-code style)."""
        root: dict = {}
        for seq, item in zip(self.sequences.tolist(), self.leaf_item.tolist()):
            node = root
            for tok in seq[:-1]:
                node = node.setdefault(tok, {})
            node[seq[-1]] = item
        return root
