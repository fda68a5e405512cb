"""A trained generative model as a Ranker: prompt -> constrained beam search -> items.

Recommendation decodes collaborative IDs after a forced `<rec_item>`, search decodes semantic IDs
after a forced `<src_item>`: the same split of needs the model was trained on. Prompts are
template 0 of the task, exactly as validation examples were written.

Full-catalogue ranking bans the case's `exclude` items (the user's history) inside the beam, as
a scoring baseline masks them before its top-K: no beam is spent on them and the list holds k
items whenever k are allowed. With candidates (the paper's
100-candidate protocol) the prefix index is built from each case's candidates only.

With `members` (the other models of an ensemble, model/ensemble.py) the model and its members
decode as one: the mean of their next-token distributions at every step. A timeline model can
also read each prompt at several lengths (`extra_prompt_tokens`): every (model, length) pair is
one more member of that mean.

With `search_rec_weight` w > 0, search ranks its beam by log p(semantic ID | history, query) +
w * log p(collaborative ID | history): the model's own recommendation head says which of the items
that match the query this user would pick next.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import torch

from gensar_core.identifiers.naming import parse_id
from gensar_core.model.backbone import Backbone, load_trained
from gensar_core.model.corpus import enabled_tasks
from gensar_core.model.data import encode_prompts
from gensar_core.model.decode import constrained_beam_search
from gensar_core.model.prefix_index import PrefixIndex
from gensar_core.model.prompts import ItemIds, fill, render_history, templates
from gensar_core.model.timeline import TimelineCodec
from gensar_core.model.vocab import REC_ITEM, SRC_ITEM

log = logging.getLogger(__name__)

TARGET_ID = {"rec": ("collaborative_id", REC_ITEM), "search": ("semantic_id", SRC_ITEM)}


@dataclass(frozen=True)
class DecodeSettings:
    """How a GenerativeRanker decodes: built from a config by `ranker_settings`, and saved as JSON
    with a registered model, so batch scoring and serving decode the way evaluation did."""

    beam_size: int
    normalize: str                 # what each step's softmax runs over: prefix, level or vocab (model/decode.py)
    search_rec_weight: float = 0.0  # the recommendation head as a prior on search (0: off)
    max_rec_history: int = 5        # history events of each behaviour a prompt is written from
    max_search_history: int = 5
    max_input_length: int = 192     # prompt tokens (a timeline model: its window)
    prompt_tokens: Optional[int] = None      # a timeline model's prompt length (None: its window)
    extra_prompt_tokens: tuple[int, ...] = ()  # more prompt lengths each model also reads
    batch_size: int = 16            # cases decoded at once

    @classmethod
    def from_json(cls, payload: dict) -> "DecodeSettings":
        """Settings a registered model saved (`scoring` is what models registered before
        2026-12-08 called `normalize`)."""
        payload = dict(payload)
        if "scoring" in payload:
            payload["normalize"] = payload.pop("scoring")
        return cls(**{**payload, "extra_prompt_tokens": tuple(payload.get("extra_prompt_tokens", ()))})

    def to_json(self) -> dict:
        return {**asdict(self), "extra_prompt_tokens": list(self.extra_prompt_tokens)}


def ranker_settings(cfg, validation: bool = False) -> DecodeSettings:
    """The decoding settings of a config. `validation`: those in-training validation decodes with,
    one prompt length and no rec prior on search (each checkpoint is chosen as before these
    ranking options existed, and validation stays fast)."""
    both = {"rec", "search"} <= set(enabled_tasks(cfg.corpus))
    settings = {"beam_size": cfg.evaluate.beam_size, "normalize": cfg.evaluate.normalize,
                "search_rec_weight": cfg.evaluate.search_rec_weight if both and not validation else 0.0}
    if cfg.model.formulation == "timeline":
        # the whole history: batch scoring and serving pass this many events of each behaviour,
        # the prompt keeps the most recent ones that fit in the window
        longest = cfg.model.timeline.max_len
        return DecodeSettings(**settings, max_rec_history=longest, max_search_history=longest,
                              max_input_length=longest, prompt_tokens=cfg.model.timeline.prompt_tokens,
                              extra_prompt_tokens=() if validation else tuple(cfg.model.timeline.extra_prompt_tokens))
    return DecodeSettings(**settings, max_rec_history=cfg.corpus.max_rec_history,
                          max_search_history=cfg.corpus.max_search_history,
                          max_input_length=cfg.model.prompted.max_input_length)


class GenerativeRanker:
    """Ranks items for 'rec' and 'search' cases with a model folder written by a training."""

    def __init__(self, model_dir: str | Path | Backbone, identifiers: pd.DataFrame, settings: DecodeSettings, *,
                 tasks: Sequence[str] = ("rec", "search"), name: str = "gensar", members: Sequence[str | Path] = (),
                 device: Optional[str] = None):
        # a model folder, or a Backbone in memory (validation during training)
        self.backbone = model_dir if isinstance(model_dir, Backbone) else load_trained(model_dir, device=device)
        self.model, self.tokenizer, self.kind = self.backbone.model, self.backbone.tokenizer, self.backbone.kind
        self.device = next(self.model.parameters()).device
        self.beam_size, self.normalize, self.batch_size = settings.beam_size, settings.normalize, settings.batch_size
        self.max_rec, self.max_search = settings.max_rec_history, settings.max_search_history
        self.max_input = settings.max_input_length
        self.name, self.tasks = name, tuple(tasks)
        label = self.backbone.label if isinstance(model_dir, Backbone) else Path(model_dir).name
        ids = identifiers.sort_values("item_idx").reset_index(drop=True)
        self.item_idx = ids["item_idx"].to_numpy(np.int64)
        self.item_ids = {str(r.item_id): ItemIds(r.semantic_id, r.collaborative_id) for r in ids.itertuples()}
        # what the decoder runs: the model and its ensemble members
        self.models = [self.model, *(self.member(folder, device) for folder in members)]
        # the recommendation head as a prior on search needs a model trained for both
        self.search_rec_weight = settings.search_rec_weight if {"rec", "search"} <= set(self.tasks) else 0.0
        # a timeline model (model/timeline.py) reads the whole history, up to its window length
        # (or the shorter `prompt_tokens`)
        self.timeline = None
        if self.backbone.source.get("formulation") == "timeline":
            self.timeline = TimelineCodec.of(self.tokenizer, self.item_ids,
                                             bool(self.backbone.source.get("history_ids", False)))
            window = int(self.backbone.source["max_len"])
            self.max_input = min(settings.prompt_tokens or window, window)
        # the prompt lengths each model reads (a prompted model's history is fixed: one)
        self.views = (self.max_input,) if self.timeline is None else tuple(
            dict.fromkeys([self.max_input, *(min(n, window) for n in settings.extra_prompt_tokens)]))
        ensemble = f", ensemble of {len(self.models)} models" if len(self.models) > 1 else ""
        views = f" x {len(self.views)} prompt lengths {list(self.views)}" if len(self.views) > 1 else ""
        prior = f", search + {self.search_rec_weight:g} x rec log-prob" if self.search_rec_weight else ""
        self.description = (f"generative model {label}{ensemble}{views}, constrained beam {self.beam_size}, "
                            f"{self.normalize} normalisation{prior}")
        self.sequences, self.index, self.prefix = {}, {}, {}
        for task, (column, behaviour) in TARGET_ID.items():
            full = PrefixIndex.from_identifiers(ids[column].tolist(), self.tokenizer, item_ids=self.item_idx)
            self.index[task] = full.to(self.device)
            self.sequences[task] = full_sequences(ids[column].tolist(), self.tokenizer)
            self.prefix[task] = torch.tensor(self.tokenizer.convert_tokens_to_ids([behaviour]), device=self.device)
        self._row_of = {int(i): r for r, i in enumerate(self.item_idx)}
        self.folders = [] if isinstance(model_dir, Backbone) else [str(model_dir), *map(str, members)]

    def info(self) -> dict:
        """What the report records beside the scores: the model folders and their size."""
        return {"model_dirs": self.folders, "models": len(self.models), "prompt_lengths": list(self.views),
                "parameters": int(sum(p.numel() for m in self.models for p in m.parameters()))}

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
        """The cases' prompts for `task` (a timeline prompt: the latest events that fit in the
        first of `views`)."""
        return self.view_prompts(cases, task, self.views[:1])[0]

    def view_prompts(self, cases: pd.DataFrame, task: str,
                     lengths: Optional[Sequence[int]] = None) -> list[list[str]]:
        """The cases' prompts at each prompt length, `views` by default (one list per length; a
        prompted model's history is fixed, so it has one list)."""
        lengths = self.views if lengths is None else lengths
        queries = cases["query"] if "query" in cases else [None] * len(cases)
        if self.timeline is not None:  # the whole history when the cases have it (evaluation)
            histories = cases["timeline"] if "timeline" in cases else cases["history"]
            per_case = [self.timeline.prompts(h if h is not None else [], task, q, lengths)
                        for h, q in zip(histories, queries)]
            return [list(view) for view in zip(*per_case)] if per_case else [[] for _ in lengths]
        template = templates(task)[0]
        out = []
        for history, query in zip(cases["history"], queries):
            # an item without an ID (added to the catalogue after this model's table) cannot be
            # written in the prompt: it is left out of the history rather than failing the case
            events = [e for e in (history if history is not None else []) if str(e["item_id"]) in self.item_ids]
            text = render_history(events, self.item_ids, self.max_rec, self.max_search)
            out.append(fill(template, history=text, query=(query or "").strip()))
        return [out]

    def encode(self, prompts: list[str], length: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> (input_ids, attention_mask) [B, S] on the model's device, padded for its kind."""
        ids = encode_prompts(self.tokenizer, self.kind, prompts, length or self.max_input)
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
    def decode(self, views: Sequence[list[str]], task: str, beam: int, top_k: int,
               index: Optional[PrefixIndex] = None, banned: Optional[Sequence] = None) -> tuple[np.ndarray, np.ndarray]:
        """(items [B, top_k], scores [B, top_k]) for prompts of one task, item -1 where none;
        `views`: the same B prompts at each of `self.views` (`view_prompts`); `banned` (per
        prompt) items are never decoded."""
        index = index if index is not None else self.index[task]
        items, scores = [], []
        for start in range(0, len(views[0]), self.batch_size):
            inputs = [self.encode(prompts[start:start + self.batch_size], length)
                      for length, prompts in zip(self.views, views, strict=True)]
            # every model reads every view: one ensemble member per (view, model) pair
            input_ids = [ids for ids, _ in inputs for _ in self.models]
            masks = [mask for _, mask in inputs for _ in self.models]
            ban = None if banned is None else list(banned[start:start + self.batch_size])
            it, sc = constrained_beam_search(self.models * len(inputs), input_ids, masks, index, beam_size=beam,
                                             top_k=top_k, prefix_tokens=self.prefix[task],
                                             normalize=self.normalize, banned=ban)
            items.append(it.cpu().numpy())
            scores.append(sc.float().cpu().numpy())
        return np.concatenate(items), np.concatenate(scores)

    def top_k_unseen(self, cases: pd.DataFrame, task: str, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per case the k best items outside its `exclude` items (a column, when the cases have
        it), with their scores (log-probs; on search with the rec prior, plus w times the rec
        log-prob): the excluded items are banned inside the beam, so no beam is spent on them and
        a list is short only when fewer than k items are allowed."""
        beam = max(self.beam_size, k)
        banned = list(cases["exclude"]) if "exclude" in cases else None
        views = self.view_prompts(cases, task)
        if task == "search" and self.search_rec_weight:
            items, scores = self.with_rec_prior(cases, *self.decode(views, task, beam, beam, banned=banned), k)
        else:
            items, scores = self.decode(views, task, beam, k, banned=banned)
        return [(row_items[row_items >= 0], row_scores[row_items >= 0]) for row_items, row_scores in zip(items, scores)]

    def with_rec_prior(self, cases: pd.DataFrame, items: np.ndarray, scores: np.ndarray,
                       k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k best of each case's search beam (`items`, `scores` [B, W], item -1 where none) by
        search log-prob + `search_rec_weight` x the log-prob of the item's collaborative ID after
        the case's history and `<rec_item>`. The rec pass scores exactly the beam's items: every
        other item is banned and its beam is as wide as they are, so it keeps them all."""
        width = items.shape[1]
        banned = [np.setdiff1d(self.item_idx, row[row >= 0]) for row in items]
        found, rec = self.decode(self.view_prompts(cases, "rec"), "rec", width, width, banned=banned)
        prior = np.full(items.shape, -np.inf)
        for r, (row_found, row_rec) in enumerate(zip(found, rec)):
            of = dict(zip(row_found.tolist(), row_rec.tolist()))
            prior[r] = [of.get(int(i), -np.inf) for i in items[r]]
        combined = np.where(items >= 0, scores + self.search_rec_weight * prior, -np.inf)
        order = np.argsort(-combined, axis=1, kind="stable")[:, :k]
        items, combined = np.take_along_axis(items, order, 1), np.take_along_axis(combined, order, 1)
        return np.where(np.isfinite(combined), items, -1), combined

    def rank(self, cases: pd.DataFrame, task: str, k: int,
             candidates: Optional[Sequence[np.ndarray]] = None) -> list[np.ndarray]:
        if task not in self.tasks:
            raise NotImplementedError(f"{self.name} is not trained for {task}")
        if candidates is None:
            return [items.astype(np.int64) for items, _ in self.top_k_unseen(cases, task, k)]
        if self.normalize != "prefix":
            # the full trie with every other item banned, the cases in batches (a trie per case
            # decodes one case at a time): `vocab` scores are the same as over a trie of the
            # candidates, `level` normalises over the catalogue's codebook, as in full ranking
            others = [np.setdiff1d(self.item_idx, np.asarray(c, dtype=np.int64)) for c in candidates]
            return [items.astype(np.int64) for items, _ in self.top_k_unseen(cases.assign(exclude=others), task, k)]
        return self.rank_each_among(cases, task, k, candidates)

    def rank_each_among(self, cases: pd.DataFrame, task: str, k: int,
                        candidates: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The paper's way: each case decoded alone over a trie of its candidates."""
        out = []
        views = self.view_prompts(cases, task)
        prior = task == "search" and self.search_rec_weight
        for row, cand in enumerate(candidates):
            cand = np.asarray(cand, dtype=np.int64)
            rows = [self._row_of[int(i)] for i in cand]
            index = PrefixIndex.from_sequences(self.sequences[task][rows], item_ids=cand).to(self.device)
            beam = min(max(self.beam_size, k), len(cand))
            one = [prompts[row:row + 1] for prompts in views]
            if prior:
                beam_items, beam_scores = self.decode(one, task, beam, beam, index=index)
                items, _ = self.with_rec_prior(cases.iloc[row:row + 1], beam_items, beam_scores, min(k, beam))
            else:
                items, _ = self.decode(one, task, beam, min(k, beam), index=index)
            out.append(items[0][items[0] >= 0])
        return out


def full_sequences(identifiers: Sequence[str], tokenizer) -> torch.Tensor:
    """Token ids [N, L] of each ID string (no behaviour token), in the given order."""
    rows = [tokenizer.convert_tokens_to_ids([f"<{l}_{c}>" for l, c in parse_id(i)]) for i in identifiers]
    return torch.tensor(rows, dtype=torch.long)
