"""The decoder states beam search advances: one per model kind (T5's own is in t5_tree.py).

Each has `start()` -> the last hidden state of every input [users, d], and `advance(src_rows,
tokens, rows_changed, need)` -> the hidden state of every kept beam after its new token.
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch
from torch import Tensor

from gensar_core.model.beam_tree import BeamTree, additive, spread


def cache_kwarg(module) -> str:
    params = inspect.signature(module.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


class Seq2SeqState:
    """Any other encoder-decoder: encoder once; the HF decoder on one row per beam, KV cache
    reordered by beam index (the cross-attention cache only when rows change inputs)."""

    def __init__(self, model, input_ids: Tensor, attention_mask: Tensor, prefix: Tensor):
        config = model.config
        start = config.decoder_start_token_id if config.decoder_start_token_id is not None else config.pad_token_id
        self.decoder = model.get_decoder()
        self.cache_kw = cache_kwarg(self.decoder)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        self.users = input_ids.shape[0]
        self.enc_full = model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        self.mask_full = attention_mask
        self.enc, self.mask = self.enc_full, self.mask_full  # expanded to one row per beam
        starts = torch.full((self.users, 1), int(start), dtype=torch.long, device=input_ids.device)
        self.first = torch.cat([starts, prefix], dim=1)
        self.cache = None

    def start(self) -> Tensor:
        return self._run(self.first)

    def advance(self, src_rows: Tensor, tokens: Tensor, rows_changed: bool,
                need: Optional[Tensor] = None) -> Tensor:
        cache = self.cache  # one row per beam: every beam is computed, `need` or not
        if hasattr(cache, "self_attention_cache"):
            cache.self_attention_cache.reorder_cache(src_rows)
            if rows_changed:  # beams of one input share their cross-attention cache rows
                cache.cross_attention_cache.reorder_cache(src_rows)
        else:
            cache.reorder_cache(src_rows)
        if rows_changed:
            user = torch.arange(src_rows.numel(), device=src_rows.device) // (src_rows.numel() // self.users)
            self.enc, self.mask = self.enc_full.index_select(0, user), self.mask_full.index_select(0, user)
        return self._run(tokens[:, None])

    def _run(self, ids: Tensor) -> Tensor:
        out = self.decoder(input_ids=ids, encoder_hidden_states=self.enc, encoder_attention_mask=self.mask,
                           use_cache=True, **{self.cache_kw: self.cache})
        self.cache = cache_of(out)
        return out.last_hidden_state[:, -1]


class CausalState:
    """Decoder-only: the prompt (left-padded) once, then the beams' tokens as a tree.

    Every input keeps one row. Each step appends its beams' new tokens to that row's KV cache;
    a 4D attention mask lets a token see the prompt and its own ancestors only, and all tokens of
    one step share the position prompt length + step. So the prompt's keys and values are never
    copied per beam and the cache is never reordered. Attention implementations that take no 4D
    mask (flash attention) fall back to one row per beam, reordered by beam index.
    """

    def __init__(self, model, input_ids: Tensor, attention_mask: Tensor, prefix: Tensor):
        if attention_mask is not None and not bool(attention_mask[:, -1].all()):
            raise ValueError("decoder-only prompts must be left-padded (attention_mask[:, -1] all ones)")
        self.body = model.base_model
        if self.body is model:
            raise ValueError(f"{type(model).__name__}: cannot find the decoder body (base_model)")
        self.cache_kw = cache_kwarg(self.body)
        self.as_tree = getattr(model.config, "_attn_implementation", "eager") in ("sdpa", "eager")
        self.dtype = model.get_input_embeddings().weight.dtype
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        self.ids = torch.cat([input_ids, prefix], dim=1)
        self.mask = torch.cat([attention_mask, torch.ones_like(prefix)], dim=1).bool()
        self.users = input_ids.shape[0]
        self.tree = BeamTree(self.users, input_ids.device)
        self.cache = None

    def start(self) -> Tensor:
        position = (self.mask.long().cumsum(-1) - 1).clamp_min(0)
        self.next_position = position[:, -1] + 1  # [users]
        return self._run(self.ids, None if self.mask.all() else self.mask, position)[:, -1]

    def advance(self, src_rows: Tensor, tokens: Tensor, rows_changed: bool,
                need: Optional[Tensor] = None) -> Tensor:
        if not self.as_tree:  # one row per beam: every beam is computed, `need` or not
            self.cache.reorder_cache(src_rows)
            if rows_changed:
                self.mask = self.mask.index_select(0, src_rows)
                self.next_position = self.next_position.index_select(0, src_rows)
            self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
            position = self.next_position[:, None]
            self.next_position = self.next_position + 1
            return self._run(tokens[:, None], self.mask, position)[:, -1]
        seen, tokens, pick = self.tree.step(src_rows, tokens, need)
        users, n = tokens.shape
        visible = torch.cat([self.mask[:, None, :].expand(-1, n, -1), seen], dim=2)[:, None]
        position = self.next_position[:, None].expand(-1, n)
        self.next_position = self.next_position + 1
        return spread(self._run(tokens, additive(visible, self.dtype), position), pick, src_rows.numel() // users)

    def _run(self, ids: Tensor, mask: Optional[Tensor], position: Tensor) -> Tensor:
        out = self.body(input_ids=ids, attention_mask=mask, position_ids=position,
                        use_cache=True, **{self.cache_kw: self.cache})
        self.cache = cache_of(out)
        return out.last_hidden_state
