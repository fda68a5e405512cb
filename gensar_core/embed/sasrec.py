"""SASRec: a small causal transformer over item sequences (Kang & McAuley, 2018).

Item ids inside the model are item_idx + 1; 0 is padding. Sequences are left-padded so the most
recent item always sits in the last position. One item table serves as input embedding and as
output layer (scores are dot products with it), so its rows are the collaborative item vectors.

With `query_dim` > 0 the model also reads queries (the query-aware search baseline,
baselines/tuning.py): the input at each position adds a projection of the vector of the query that
led to the *next* event (zeros where the next event is a recommendation), so the output there
predicts the next item knowing what the user searched for.

Saved as `model.safetensors` + `config.json` (no pickle), read back with `load_sasrec`.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

PAD = 0


@dataclass
class SASRecConfig:
    num_items: int
    dim: int = 64
    layers: int = 2
    heads: int = 2
    max_len: int = 50
    dropout: float = 0.2
    query_dim: int = 0  # > 0: the query-aware variant (see the module docstring)


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed[:, None], dropout_p=self.dropout if self.training else 0.0
        )
        return self.out(y.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm transformer block: attention then feed-forward, each with a residual."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x), allowed))
        return x + self.drop(self.ffn(self.norm2(x)))


class SASRec(nn.Module):
    def __init__(self, config: SASRecConfig):
        super().__init__()
        if config.dim % config.heads:
            raise ValueError(f"dim {config.dim} must be divisible by heads {config.heads}")
        self.config = config
        self.item_emb = nn.Embedding(config.num_items + 1, config.dim, padding_idx=PAD)
        self.pos_emb = nn.Embedding(config.max_len, config.dim)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            Block(config.dim, config.heads, config.dropout) for _ in range(config.layers)
        )
        self.norm = nn.LayerNorm(config.dim)
        self.query_proj = nn.Linear(config.query_dim, config.dim) if config.query_dim else None
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        # small init (as BERT/RecBole): dot-product logits start near zero, softmax near uniform
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()

    @property
    def device(self) -> torch.device:
        return self.item_emb.weight.device

    def forward(self, seq: torch.Tensor, next_query: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, L) model ids, left-padded -> (B, L, dim) hidden state after each position.
        `next_query`: (B, L, dim), the query of the event after each position already passed
        through `query_proj` (None: no queries, which is the projection of zero vectors). Callers
        project: training gathers projected rows of its query table, scoring projects the vectors."""
        b, n = seq.shape
        real = seq != PAD
        # a batch cut to its longest history (left padding) keeps the positions of the full window
        x = self.item_emb(seq) + self.pos_emb(torch.arange(self.config.max_len - n, self.config.max_len,
                                                           device=seq.device))
        if self.query_proj is not None:
            x = x + (next_query if next_query is not None else self.query_proj.bias)
        x = self.drop(x) * real[..., None]
        # position i sees real positions j <= i; a padding position sees only itself, so no
        # row of the attention is empty (an empty row would give NaN)
        causal = torch.ones(n, n, dtype=torch.bool, device=seq.device).tril()
        eye = torch.eye(n, dtype=torch.bool, device=seq.device)
        allowed = (causal & real[:, None, :]) | eye
        for block in self.blocks:
            x = block(x, allowed)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Scores over the real items (column i is item_idx i)."""
        return hidden @ self.item_emb.weight[1:].T

    # ------------------------------------------------------------ public API
    def item_embeddings(self) -> np.ndarray:
        """(N, dim) float32, row i is item_idx i."""
        return self.item_emb.weight[1:].detach().float().cpu().numpy().copy()

    def encode_histories(self, histories: Sequence[Sequence[int]]) -> torch.Tensor:
        """Histories of item_idx (oldest first) -> (B, max_len) left-padded model ids."""
        n = self.config.max_len
        out = torch.zeros(len(histories), n, dtype=torch.long)
        for row, hist in enumerate(histories):
            tail = [int(i) + 1 for i in list(hist)[-n:]]
            if tail:
                out[row, n - len(tail):] = torch.tensor(tail)
        return out

    def encode_next_queries(self, next_queries: Sequence[np.ndarray]) -> torch.Tensor:
        """Per history, (len(history), query_dim) vectors of the query after each item (the last
        row: the query being answered, zeros for a recommendation) -> (B, max_len, query_dim),
        aligned with `encode_histories`."""
        n = self.config.max_len
        out = torch.zeros(len(next_queries), n, self.config.query_dim)
        for row, vectors in enumerate(next_queries):
            tail = np.asarray(vectors, dtype=np.float32)[-n:]
            if len(tail):
                out[row, n - len(tail):] = torch.from_numpy(tail)
        return out

    @torch.no_grad()
    def score(self, histories: Sequence[Sequence[int]], batch_size: int = 512,
              next_queries: Optional[Sequence[np.ndarray]] = None) -> np.ndarray:
        """Next-item scores: (B, N) float32 for histories of item_idx (oldest first).

        Only the last `max_len` items of each history are used; an empty history is allowed.
        Nothing is masked: callers exclude already-seen items themselves. `next_queries`: for a
        query-aware model, see `encode_next_queries` (None: no queries).
        """
        was_training = self.training
        self.eval()
        parts = []
        for start in range(0, len(histories), batch_size):
            seq = self.encode_histories(histories[start:start + batch_size]).to(self.device)
            queries = None
            if next_queries is not None and self.query_proj is not None:
                vectors = self.encode_next_queries(next_queries[start:start + batch_size]).to(self.device)
                queries = self.query_proj(vectors)
            parts.append(self.logits(self(seq, queries)[:, -1]).float().cpu().numpy())
        self.train(was_training)
        if not parts:
            return np.zeros((0, self.config.num_items), dtype=np.float32)
        return np.concatenate(parts)


def save_sasrec(model: SASRec, folder: str | Path) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(asdict(model.config), indent=2))


def load_sasrec(folder: str | Path, device: Optional[str] = None) -> SASRec:
    """Read a model written by `save_sasrec`, in eval mode."""
    folder = Path(folder)
    config = SASRecConfig(**json.loads((folder / "config.json").read_text()))
    model = SASRec(config)
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return model.to(device or "cpu").eval()


def baseline_dir(warehouse: str | Path, name: str) -> Path:
    """Where tune_baselines keeps a tuned baseline's models: one `seed-<S>` folder each."""
    return Path(warehouse) / "models" / "baselines" / name


def tuned_seeds(seed: int, ensemble_seeds: Sequence[int]) -> list[int]:
    """The train seeds of the tuned baselines, the config's own first: those of the generative
    ensemble, so one model compares with one and three with three."""
    return list(dict.fromkeys([seed, *ensemble_seeds]))


def load_tuned(warehouse: str | Path, name: str, seeds: Sequence[int]) -> list[SASRec]:
    """The tuned models of `name` at `seeds` (all present), or [] when the baseline was not tuned."""
    folders = [baseline_dir(warehouse, name) / f"seed-{s}" for s in seeds]
    if not all((f / "config.json").exists() for f in folders):
        return []
    return [load_sasrec(f) for f in folders]
