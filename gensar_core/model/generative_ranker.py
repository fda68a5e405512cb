"""A trained generative model as a Ranker: prompt -> constrained beam search -> items.

Recommendation decodes collaborative IDs after a forced `<rec_item>`, search decodes semantic IDs
after a forced `<src_item>`: the same split of needs the model was trained on. Prompts are
template 0 of the task, exactly as validation examples were written.

Full-catalogue ranking bans the case's `exclude` items (the user's history) inside the beam, as
a scoring baseline masks them before its top-K: no beam is spent on them and the list holds k
items whenever k are allowed. With candidates (the paper's
100-candidate protocol) the prefix index is built from each case's candidates only.

With `members` (the other models of an ensemble, model/ensemble.py) the model and its members
decode as one: the mean of their next-token distributions at every step.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import torch

from gensar_core.model.backbone import Backbone, load_trained
from gensar_core.model.data import encode_prompts
from gensar_core.model.decode import constrained_beam_search
from gensar_core.model.prefix_index import PrefixIndex
from gensar_core.model.prompts import ItemIds, fill, render_history, templates
from gensar_core.model.vocab import REC_ITEM, SRC_ITEM

log = logging.getLogger(__name__)

TARGET_ID = {"rec": ("collaborative_id", REC_ITEM), "search": ("semantic_id", SRC_ITEM)}


def ranker_settings(cfg) -> dict:
    """The decoding settings of a config, as GenerativeRanker keyword arguments (also saved with a
    registered model, so serving decodes the way evaluation did)."""
    if cfg.model.formulation == "timeline":
        # the whole history: batch scoring and serving pass this many events of each behaviour,
        # the prompt keeps the most recent ones that fit in the window
        longest = cfg.model.timeline.max_len
        return {"beam_size": cfg.evaluate.beam_size, "scoring": cfg.evaluate.scoring,
                "max_rec_history": longest, "max_search_history": longest, "max_input_length": longest,
                "prompt_tokens": cfg.model.timeline.prompt_tokens}
    return {"beam_size": cfg.evaluate.beam_size, "scoring": cfg.evaluate.scoring,
            "max_rec_history": cfg.corpus.max_rec_history,
            "max_search_history": cfg.corpus.max_search_history,
            "max_input_length": cfg.model.max_input_length}


class GenerativeRanker:
    """Ranks items for 'rec' and 'search' cases with a model folder written by `run_train`."""

    def __init__(self, model_dir: str | Path | Backbone, identifiers: pd.DataFrame, *, beam_size: int,
                 scoring: str, batch_size: int = 16, max_rec_history: int = 5, max_search_history: int = 5,
                 max_input_length: int = 192, device: Optional[str] = None, name: str = "gensar",
                 tasks: Sequence[str] = ("rec", "search"), prompt_tokens: Optional[int] = None,
                 members: Sequence[str | Path] = ()):
        # a model folder, or a Backbone in memory (validation during training)
        self.backbone = model_dir if isinstance(model_dir, Backbone) else load_trained(model_dir, device=device)
        self.model, self.tokenizer, self.kind = self.backbone.model, self.backbone.tokenizer, self.backbone.kind
        self.device = next(self.model.parameters()).device
        self.beam_size, self.scoring, self.batch_size = beam_size, scoring, batch_size
        self.max_rec, self.max_search, self.max_input = max_rec_history, max_search_history, max_input_length
        self.name, self.tasks = name, tuple(tasks)
        label = self.backbone.label if isinstance(model_dir, Backbone) else Path(model_dir).name
        ids = identifiers.sort_values("item_idx").reset_index(drop=True)
        self.item_idx = ids["item_idx"].to_numpy(np.int64)
        self.item_ids = {str(r.item_id): ItemIds(r.semantic_id, r.collaborative_id) for r in ids.itertuples()}
        # what the decoder runs: the model and its ensemble members
        self.models = [self.model, *(self.member(folder, device) for folder in members)]
        ensemble = f", ensemble of {len(self.models)} models" if len(self.models) > 1 else ""
        self.description = f"generative model {label}{ensemble}, constrained beam {beam_size}, {scoring} scoring"
        # a timeline model (model/timeline.py) reads the whole history, up to its window length
        # (or the shorter `prompt_tokens`)
        self.timeline = None
        if self.backbone.source.get("formulation") == "timeline":
            from gensar_core.model.timeline import TimelineCodec

            self.timeline = TimelineCodec.of(self.tokenizer, self.item_ids,
                                             bool(self.backbone.source.get("history_ids", False)))
            window = int(self.backbone.source["max_len"])
            self.max_input = min(prompt_tokens or window, window)
        self.sequences, self.index, self.prefix = {}, {}, {}
        for task, (column, behaviour) in TARGET_ID.items():
            full = PrefixIndex.from_identifiers(ids[column].tolist(), self.tokenizer, item_ids=self.item_idx)
            self.index[task] = full.to(self.device)
            self.sequences[task] = full_sequences(ids[column].tolist(), self.tokenizer)
            self.prefix[task] = torch.tensor(self.tokenizer.convert_tokens_to_ids([behaviour]), device=self.device)
        self._row_of = {int(i): r for r, i in enumerate(self.item_idx)}

    def member(self, folder: Path, device: Optional[str]):
        """An ensemble member's model; it must read and write the same tokens as the model."""
        if not (Path(folder) / "config.json").exists():
            raise FileNotFoundError(f"ensemble member {folder}: no trained model there (train it, or drop its seed "
                                    f"from train.ensemble_seeds)")
        other = load_trained(folder, device=device)
        # the prompts are written once, by the model's settings, for every member
        if (other.tokenizer.get_vocab() != self.tokenizer.get_vocab() or other.kind != self.kind
                or self.prompt_settings(other.source) != self.prompt_settings(self.backbone.source)):
            raise ValueError(f"ensemble member {folder}: its vocabulary, model kind or prompt settings "
                             f"(formulation, max_len, history_ids) differ from its ensemble's model; members "
                             f"must be trained on the same data and settings")
        return other.model

    def prompt_settings(self, source: dict) -> tuple:
        """What decides how a model's prompts are written: its formulation, its window and, where
        an item's two IDs differ (not TIGER-style), whether history items carry the other ID's codes."""
        dual = any(i.semantic_id != i.collaborative_id for i in self.item_ids.values())
        return source.get("formulation"), source.get("max_len"), dual and bool(source.get("history_ids", False))

    # ------------------------------------------------------------------ prompts
    def prompts(self, cases: pd.DataFrame, task: str) -> list[str]:
        queries = cases["query"] if "query" in cases else [None] * len(cases)
        if self.timeline is not None:  # the whole history when the cases have it (evaluation)
            histories = cases["timeline"] if "timeline" in cases else cases["history"]
            return [self.timeline.prompt(h if h is not None else [], task, q, self.max_input)
                    for h, q in zip(histories, queries)]
        template = templates(task)[0]
        out = []
        for history, query in zip(cases["history"], queries):
            # an item without an ID (added to the catalogue after this model's table) cannot be
            # written in the prompt: it is left out of the history rather than failing the case
            events = [e for e in (history if history is not None else []) if str(e["item_id"]) in self.item_ids]
            text = render_history(events, self.item_ids, self.max_rec, self.max_search)
            out.append(fill(template, history=text, query=(query or "").strip()))
        return out

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> (input_ids, attention_mask) [B, S] on the model's device, padded for its kind."""
        ids = encode_prompts(self.tokenizer, self.kind, prompts, self.max_input)
        width = max(len(x) for x in ids)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for r, x in enumerate(ids):
            # decoder-only prompts are left-padded so every prompt ends where generation starts
            cols = slice(width - len(x), width) if self.kind == "causal" else slice(0, len(x))
            input_ids[r, cols] = torch.tensor(x)
            mask[r, cols] = 1
        return input_ids.to(self.device), mask.to(self.device)

    # ------------------------------------------------------------------ ranking
    @torch.inference_mode()
    def decode(self, prompts: list[str], task: str, beam: int, top_k: int,
               index: Optional[PrefixIndex] = None, banned: Optional[Sequence] = None) -> tuple[np.ndarray, np.ndarray]:
        """(items [B, top_k], scores [B, top_k]) for prompts of one task, item -1 where none;
        `banned` (per prompt) items are never decoded."""
        index = index if index is not None else self.index[task]
        items, scores = [], []
        for start in range(0, len(prompts), self.batch_size):
            input_ids, mask = self.encode(prompts[start:start + self.batch_size])
            ban = None if banned is None else list(banned[start:start + self.batch_size])
            it, sc = constrained_beam_search(self.models, input_ids, mask, index, beam_size=beam,
                                             top_k=top_k, prefix_tokens=self.prefix[task],
                                             normalize=self.scoring, banned=ban)
            items.append(it.cpu().numpy())
            scores.append(sc.float().cpu().numpy())
        return np.concatenate(items), np.concatenate(scores)

    def top_k_unseen(self, prompts: list[str], task: str, k: int,
                     exclude: Sequence) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per prompt the k best items outside its `exclude` items, with their log-probs: the
        excluded items are banned inside the beam, so no beam is spent on them and a list is
        short only when fewer than k items are allowed."""
        beam = max(self.beam_size, k)
        items, scores = self.decode(prompts, task, beam, k, banned=list(exclude))
        return [(row_items[row_items >= 0], row_scores[row_items >= 0]) for row_items, row_scores in zip(items, scores)]

    def rank(self, cases: pd.DataFrame, task: str, k: int,
             candidates: Optional[Sequence[np.ndarray]] = None) -> list[np.ndarray]:
        if task not in self.tasks:
            raise NotImplementedError(f"{self.name} is not trained for {task}")
        prompts = self.prompts(cases, task)
        if candidates is None:
            exclude = cases["exclude"] if "exclude" in cases else [()] * len(cases)
            return [items.astype(np.int64) for items, _ in self.top_k_unseen(prompts, task, k, exclude)]
        out = []
        for prompt, cand in zip(prompts, candidates):
            cand = np.asarray(cand, dtype=np.int64)
            rows = [self._row_of[int(i)] for i in cand]
            index = PrefixIndex.from_sequences(self.sequences[task][rows], item_ids=cand).to(self.device)
            beam = min(max(self.beam_size, k), len(cand))
            items, _ = self.decode([prompt], task, beam, min(k, beam), index=index)
            out.append(items[0][items[0] >= 0])
        return out


def full_sequences(identifiers: Sequence[str], tokenizer) -> torch.Tensor:
    """Token ids [N, L] of each ID string (no behaviour token), in the given order."""
    from gensar_core.identifiers.naming import parse_id

    rows = [tokenizer.convert_tokens_to_ids([f"<{l}_{c}>" for l, c in parse_id(i)]) for i in identifiers]
    return torch.tensor(rows, dtype=torch.long)
