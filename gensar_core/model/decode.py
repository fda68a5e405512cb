"""Constrained beam search that can only emit valid identifiers (PAPER.md section 4), fast on CPU.

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

`hf_beam_search` is the reference, the research code's way: `model.generate(num_beams=...,
prefix_allowed_tokens_fn=...)` over a Python dict trie, with logits processors that reproduce
each scoring. Tests and `bench/decode.py` compare the two.
"""
from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from gensar_core.model.prefix_index import PrefixIndex

NORMALIZE = ("prefix", "level", "vocab")
PrefixTokens = Optional[Union[Sequence[int], Tensor]]


# ---------------------------------------------------------------- dense layers
_PACKED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


# oneDNN's linear with a dense input and output (the op torch.compile's CPU backend uses)
_LINEAR_POINTWISE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _onednn(x: Tensor) -> bool:
    return _LINEAR_POINTWISE and x.device.type == "cpu" and x.dtype == torch.float32


def _dense(x: Tensor, weight: Tensor, bias: Optional[Tensor], post: str = "none") -> Tensor:
    """`x @ weight.T + bias` [..., d] -> [..., out] by oneDNN, then `post` ('none' or 'relu');
    `weight` dense or already oneDNN's."""
    if not weight.is_mkldnn:
        weight = weight.contiguous().to_mkldnn()
    out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), weight, bias, post, [], "")
    return out.view(*x.shape[:-1], -1)


def _linear(layer: torch.nn.Linear, x: Tensor, post: str = "none") -> Tensor:
    """`layer(x)` (then ReLU with post='relu'), through oneDNN for float32 on CPU: torch's float32
    CPU matmul goes to MKL, which on AMD processors runs its AVX2 kernels (about 95 GFLOP/s a core
    on this machine's EPYC, oneDNN's AVX-512 ones about 220). The oneDNN copy of the weight is kept
    per layer and made again when the weight changes (training between evaluations)."""
    if not _onednn(x):
        out = layer(x)
        return F.relu(out) if post == "relu" else out
    weight = layer.weight
    key = (weight.data_ptr(), weight._version)
    entry = _PACKED.get(layer)
    if entry is None or entry[0] != key:
        entry = _PACKED[layer] = (key, weight.detach().contiguous().to_mkldnn())
    return _dense(x, entry[1], layer.bias, post)


def _t5_feed_forward(layer, h: Tensor) -> Tensor:
    """T5's feed-forward layer (`T5LayerFF`: norm, MLP, residual; plain or gated as in mT5) with
    its matmuls through `_linear`; dropout is off in evaluation."""
    mlp = layer.DenseReluDense
    x = layer.layer_norm(h)
    if hasattr(mlp, "wi_0"):
        x = mlp.act(_linear(mlp.wi_0, x)) * _linear(mlp.wi_1, x)
    elif isinstance(mlp.act, torch.nn.ReLU):  # T5's own: fused into the matmul
        x = _linear(mlp.wi, x, post="relu")
    else:
        x = mlp.act(_linear(mlp.wi, x))
    return h + _linear(mlp.wo, x)


# ---------------------------------------------------------------- output layer
_SCALES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


@dataclass
class OutputHead:
    """The model's output layer as `logits = (scale * hidden) @ weight.T + bias`, any rows of it.

    `weight` is the lm_head's (the input embedding when tied); `bias` adds the lm_head's bias and
    BART's `final_logits_bias`. `scale` is d_model**-0.5 for T5 checkpoints of the original recipe
    and 1 otherwise; which one a model uses changed between transformers versions and model
    types (t5 reads `scale_decoder_outputs`, mT5 in transformers 5 never scales), so it is not
    guessed from the config: it is measured once per model against the model's own logits on a
    one-token input. A head that is neither (soft-capping, logit scaling) raises.
    """

    weight: Tensor  # [V, d]
    bias: Optional[Tensor]  # [V]
    scale: float

    @classmethod
    def of(cls, model) -> "OutputHead":
        head = model.get_output_embeddings()
        bias = getattr(head, "bias", None)
        final_bias = getattr(model, "final_logits_bias", None)  # BART family
        if final_bias is not None:
            final_bias = final_bias.reshape(-1)
            bias = final_bias if bias is None else bias + final_bias
        scale = _SCALES.get(model)
        if scale is None:
            scale = _SCALES[model] = cls._measure_scale(model, head.weight, bias)
        return cls(head.weight, bias, scale)

    @staticmethod
    @torch.inference_mode()
    def _measure_scale(model, weight: Tensor, bias: Optional[Tensor]) -> float:
        config = model.config
        token = torch.tensor([[int(config.pad_token_id or 0)]], device=weight.device)
        was_training = model.training
        model.eval()
        try:
            if config.is_encoder_decoder:
                start = config.decoder_start_token_id if config.decoder_start_token_id is not None else token
                start = torch.as_tensor(start, device=weight.device).reshape(1, 1)
                enc = model.get_encoder()(input_ids=token).last_hidden_state
                hidden = model.get_decoder()(input_ids=start, encoder_hidden_states=enc).last_hidden_state
                logits = model(encoder_outputs=(enc,), decoder_input_ids=start).logits
            else:
                hidden = model.base_model(input_ids=token).last_hidden_state
                logits = model(input_ids=token).logits
        finally:
            model.train(was_training)
        width = weight.shape[1]
        for scale in (1.0, width ** -0.5):
            ours = F.linear(hidden.to(weight.dtype) * scale, weight, bias).float()
            if torch.allclose(ours, logits.float(), rtol=1e-3, atol=1e-3):
                return scale
        raise NotImplementedError(f"{config.model_type}: the output layer is not a (scaled) linear map of the "
                                  "decoder's last hidden state; constrained decoding does not support it")

    def rows(self, ids: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
        if ids is None:
            return self.weight, self.bias
        return self.weight.index_select(0, ids), None if self.bias is None else self.bias.index_select(0, ids)

    def logits(self, hidden: Tensor, ids: Optional[Tensor] = None) -> Tensor:
        """Logits of `hidden` [M, d] for the tokens `ids` (all tokens when None)."""
        weight, bias = self.rows(ids)
        return self.apply(hidden, weight, bias)

    def apply(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        if self.scale != 1.0:
            hidden = hidden * self.scale
        hidden = hidden.to(weight.dtype)
        return (_dense(hidden, weight, bias) if _onednn(hidden) else F.linear(hidden, weight, bias)).float()


# ---------------------------------------------------------------- model states
def _cache_kwarg(module) -> str:
    params = inspect.signature(module.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


class _BeamTree:
    """Which generated tokens each beam descends from, when all beams of an input share one row.

    Generated tokens are appended to the row step by step (slot = position among generated
    tokens); `grow` takes the beams just chosen (flat source rows, input-major) and returns which
    slots each new beam sees: its ancestors' and its own [users, width, slots].
    """

    def __init__(self, users: int, device):
        self.seen = torch.zeros(users, 1, 0, dtype=torch.bool, device=device)

    def grow(self, src_rows: Tensor) -> Tensor:
        users, old_width, slots = self.seen.shape
        width = src_rows.numel() // users
        parent = src_rows.view(users, width) - torch.arange(users, device=src_rows.device)[:, None] * old_width
        inherited = self.seen.gather(1, parent[:, :, None].expand(-1, -1, slots))
        own = torch.eye(width, dtype=torch.bool, device=src_rows.device).expand(users, -1, -1)
        self.seen = torch.cat([inherited, own], dim=2)
        return self.seen

    def step(self, src_rows: Tensor, tokens: Tensor,
             need: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """Grow by the chosen beams and their new tokens [users * width]: (visibility [users, n,
        slots], tokens [users, n], pick). n = width, pick None, unless `need` [users * width]
        (bool) says the pass is the last one and only some beams need it (see `only`)."""
        seen = self.grow(src_rows)
        users, width, _ = seen.shape
        tokens = tokens.view(users, width)
        if need is None:
            return seen, tokens, None
        pick, seen = self.only(seen, need.view(users, width))
        return seen, tokens.gather(1, pick), pick

    @staticmethod
    def only(seen: Tensor, need: Tensor) -> tuple[Tensor, Tensor]:
        """The final pass over the beams that `need` it [users, width] (bool), needed ones first:
        (pick [users, n] beam positions, their visibility [users, n, slots - width + n]). Rows
        with fewer than n needed beams fill up with others (computed, never wrong, just unused).
        Their new tokens are appended as n slots, so the tree is not grown past this pass."""
        users, width, slots = seen.shape
        n = int(need.sum(1).max())
        pick = need.to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :n]
        older = seen[:, :, :slots - width].gather(1, pick[:, :, None].expand(-1, -1, slots - width))
        own = torch.eye(n, dtype=torch.bool, device=seen.device).expand(users, -1, -1)
        return pick, torch.cat([older, own], dim=2)


def _spread(hidden: Tensor, pick: Optional[Tensor], width: int) -> Tensor:
    """Hidden states of the picked beams [users, n, d] -> [users * width, d], zeros elsewhere."""
    users, _, d = hidden.shape
    if pick is None:
        return hidden.reshape(users * width, d)
    out = hidden.new_zeros(users, width, d)
    return out.scatter_(1, pick[:, :, None].expand(-1, -1, d), hidden).view(users * width, d)


def _unpack(packed: Tensor, where: Tensor, shape: torch.Size) -> Tensor:
    """Rows of the real tokens [tokens, w] -> the padded layout [users, S, w], zeros at padding."""
    out = packed.new_zeros(shape.numel(), packed.shape[-1])
    return out.index_copy_(0, where, packed).view(*shape, -1)


def _additive(visible: Tensor, dtype) -> Tensor:
    """Boolean visibility -> additive attention mask (0 where visible, the dtype's minimum elsewhere)."""
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, torch.finfo(dtype).min)


class _T5Tree:
    """T5 / mT5 decoder over a beam tree, one row per input.

    The encoder runs once; cross-attention keys and values are computed once per input and never
    copied per beam: an input's beams are the queries of its row. Each step appends the beams'
    new tokens to the row's self-attention keys and values; a beam sees the decoder start and
    prefix tokens and its own ancestors, and T5's relative position bias is taken from depths in
    the tree (what a one-row-per-beam decoder sees), so scores equal `generate`'s.
    The layers are T5's own modules (norms, projections, feed-forward); only attention is here.
    """

    MODEL_TYPES = ("t5", "mt5")

    @classmethod
    def supports(cls, model) -> bool:
        config = model.config
        blocks = getattr(model.get_decoder(), "block", None)
        return (config.model_type in cls.MODEL_TYPES and blocks is not None
                and hasattr(blocks[0].layer[0].SelfAttention, "relative_attention_bias"))

    def __init__(self, model, input_ids: Tensor, attention_mask: Tensor, prefix: Tensor):
        config = model.config
        self.users = input_ids.shape[0]
        self.heads, self.d_kv = config.num_heads, config.d_kv
        self.decoder = model.get_decoder()
        self.bias_layer = self.decoder.block[0].layer[0].SelfAttention
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        self.dtype = self.decoder.embed_tokens.weight.dtype
        self.enc_mask = _additive(attention_mask.bool()[:, None, None, :], self.dtype)  # [users, 1, 1, S]
        enc, where = self._encode(model.get_encoder(), input_ids, self.enc_mask)
        cross = [block.layer[1].EncDecAttention for block in self.decoder.block]
        self.cross = [(self._heads(_unpack(_linear(att.k, enc), where, input_ids.shape)),
                       self._heads(_unpack(_linear(att.v, enc), where, input_ids.shape))) for att in cross]
        self.keys: list = [None] * len(self.decoder.block)
        self.values: list = [None] * len(self.decoder.block)
        start = config.decoder_start_token_id if config.decoder_start_token_id is not None else config.pad_token_id
        starts = torch.full((self.users, 1), int(start), dtype=torch.long, device=input_ids.device)
        self.first = torch.cat([starts, prefix], dim=1)
        self.trunk = self.first.shape[1]  # start + prefix tokens, seen by every beam
        self.tree = _BeamTree(self.users, input_ids.device)

    def _heads(self, x: Tensor) -> Tensor:  # [users, n, H * d_kv] -> [users, H, n, d_kv]
        return x.view(x.shape[0], x.shape[1], self.heads, self.d_kv).transpose(1, 2)

    def _encode(self, encoder, input_ids: Tensor, enc_mask: Tensor) -> tuple[Tensor, Tensor]:
        """T5's encoder with its projections and feed-forward run on the real tokens only, packed
        [tokens, d], so padding costs nothing there; attention runs on the padded layout, so the
        relative position bias and the result are T5's own. Returns (the packed last hidden
        states, their flat positions in [users * S])."""
        shape = input_ids.shape
        where = (enc_mask.view(-1) == 0).nonzero().squeeze(1)
        h = encoder.embed_tokens(input_ids.reshape(-1).index_select(0, where))
        bias = encoder.block[0].layer[0].SelfAttention.compute_bias(shape[1], shape[1]) + enc_mask
        for block in encoder.block:
            sa = block.layer[0]
            att = sa.SelfAttention
            x = sa.layer_norm(h)
            q, k, v = (self._heads(_unpack(_linear(proj, x), where, shape)) for proj in (att.q, att.k, att.v))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
            h = h + _linear(att.o, out.transpose(1, 2).reshape(shape.numel(), -1).index_select(0, where))
            h = _t5_feed_forward(block.layer[-1], h)
        return encoder.final_layer_norm(h), where

    def _position_bias(self, query_depth: Tensor, key_depth: Tensor) -> Tensor:
        att = self.bias_layer
        bucket = att._relative_position_bucket(key_depth[None, :] - query_depth[:, None], bidirectional=False,
                                               num_buckets=att.relative_attention_num_buckets,
                                               max_distance=att.relative_attention_max_distance)
        return att.relative_attention_bias(bucket).permute(2, 0, 1)[None]  # [1, H, q, k]

    def start(self) -> Tensor:
        depth = torch.arange(self.trunk, device=self.first.device)
        causal = depth[None, :] <= depth[:, None]
        self.key_depth = depth
        bias = self._position_bias(depth, depth) + _additive(causal, self.dtype)
        return self._run(self.first, bias)[:, -1]

    def advance(self, src_rows: Tensor, tokens: Tensor, rows_changed: bool,
                need: Optional[Tensor] = None) -> Tensor:
        seen, tokens, pick = self.tree.step(src_rows, tokens, need)  # [users, n, generated slots]
        users, n = tokens.shape
        depth = self.key_depth[-1:] + 1
        self.key_depth = torch.cat([self.key_depth, depth.expand(n)])
        trunk = seen.new_ones(users, n, self.trunk)
        visible = torch.cat([trunk, seen], dim=2)[:, None]  # [users, 1, n, keys]
        bias = self._position_bias(depth, self.key_depth) + _additive(visible, self.dtype)
        return _spread(self._run(tokens, bias), pick, src_rows.numel() // users)

    def _run(self, ids: Tensor, self_bias: Tensor) -> Tensor:
        users, n = ids.shape
        h = self.decoder.embed_tokens(ids)
        for i, block in enumerate(self.decoder.block):
            sa, ca, ff = block.layer[0], block.layer[1], block.layer[-1]
            att = sa.SelfAttention
            x = sa.layer_norm(h)
            k, v = self._heads(_linear(att.k, x)), self._heads(_linear(att.v, x))
            if self.keys[i] is not None:
                k, v = torch.cat([self.keys[i], k], dim=2), torch.cat([self.values[i], v], dim=2)
            self.keys[i], self.values[i] = k, v
            out = F.scaled_dot_product_attention(self._heads(_linear(att.q, x)), k, v, attn_mask=self_bias, scale=1.0)
            h = h + _linear(att.o, out.transpose(1, 2).reshape(users, n, -1))
            att = ca.EncDecAttention
            x = ca.layer_norm(h)
            q = self._heads(_linear(att.q, x))
            out = F.scaled_dot_product_attention(q, *self.cross[i], attn_mask=self.enc_mask, scale=1.0)
            h = h + _linear(att.o, out.transpose(1, 2).reshape(users, n, -1))
            h = _t5_feed_forward(ff, h)
        return self.decoder.final_layer_norm(h)


class _Seq2Seq:
    """Any other encoder-decoder: encoder once; the HF decoder on one row per beam, KV cache
    reordered by beam index (the cross-attention cache only when rows change inputs)."""

    def __init__(self, model, input_ids: Tensor, attention_mask: Tensor, prefix: Tensor):
        config = model.config
        start = config.decoder_start_token_id if config.decoder_start_token_id is not None else config.pad_token_id
        self.decoder = model.get_decoder()
        self.cache_kw = _cache_kwarg(self.decoder)
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
        self.cache = _cache_of(out)
        return out.last_hidden_state[:, -1]


class _Causal:
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
        self.cache_kw = _cache_kwarg(self.body)
        self.as_tree = getattr(model.config, "_attn_implementation", "eager") in ("sdpa", "eager")
        self.dtype = model.get_input_embeddings().weight.dtype
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        self.ids = torch.cat([input_ids, prefix], dim=1)
        self.mask = torch.cat([attention_mask, torch.ones_like(prefix)], dim=1).bool()
        self.users = input_ids.shape[0]
        self.tree = _BeamTree(self.users, input_ids.device)
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
        return _spread(self._run(tokens, _additive(visible, self.dtype), position), pick, src_rows.numel() // users)

    def _run(self, ids: Tensor, mask: Optional[Tensor], position: Tensor) -> Tensor:
        out = self.body(input_ids=ids, attention_mask=mask, position_ids=position,
                        use_cache=True, **{self.cache_kw: self.cache})
        self.cache = _cache_of(out)
        return out.last_hidden_state


def _prefix_matrix(prefix_tokens: PrefixTokens, users: int, device) -> Tensor:
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
def constrained_beam_search(model, input_ids: Tensor, attention_mask: Optional[Tensor], index: PrefixIndex,
                            beam_size: int, top_k: int, prefix_tokens: PrefixTokens = None,
                            normalize: str = "prefix", banned: Optional[Sequence] = None) -> tuple[Tensor, Tensor]:
    """Top-`top_k` items of each input, by beam search over the valid sequences of `index`.

    input_ids / attention_mask [B, S]: encoder inputs (seq2seq) or left-padded prompts (decoder-
    only). prefix_tokens [P] or [B, P]: tokens forced right after the decoder start / the prompt
    (e.g. the behaviour token `<rec_item>`), not scored. banned: per input, the items it must
    never return (a user's history): no beam is spent on them, nor on a prefix with no other
    item below it (see `allowed_counts`); the scores of the other items are the ones an
    unbanned search gives them. Returns (items [B, K] long, scores [B, K] float, best first); an
    input with fewer than K reachable sequences gets item -1, score -inf.
    """
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
    if not 1 <= top_k <= beam_size:
        raise ValueError(f"need 1 <= top_k <= beam_size, got top_k={top_k}, beam_size={beam_size}")
    device = input_ids.device
    index = index if index.leaf_item.device == device else index.to(device)
    users = input_ids.shape[0]
    prefix = _prefix_matrix(prefix_tokens, users, device)
    allowed = None if banned is None else index.allowed_counts(banned)
    head = OutputHead.of(model)
    if normalize != "vocab":
        level_rows = [head.rows(tokens) for tokens in index.level_tokens]
    # with "prefix", a level whose every node has one child is forced: no logits; the decoder
    # state is advanced only while a later level still has a choice to score
    scored = [normalize != "prefix" or width > 1 for width in index.width]

    was_training = model.training
    if was_training:
        model.eval()
    try:
        if not model.config.is_encoder_decoder:
            kind = _Causal
        else:
            kind = _T5Tree if _T5Tree.supports(model) else _Seq2Seq
        state = kind(model, input_ids, attention_mask, prefix)
        hidden = state.start()  # [users * width, d]
        width = 1  # beams kept per input at this level
        nodes = torch.zeros(users, dtype=torch.long, device=device)
        scores = torch.zeros(users, device=device)
        for level in range(index.levels):
            child, valid = index.children(level, nodes)  # [rows, C]
            if not scored[level]:
                logp = torch.zeros(child.shape, device=device)
            elif normalize == "prefix":
                logits = head.apply(hidden, *level_rows[level]).gather(1, index.column[level][child])
                logp = torch.log_softmax(logits.masked_fill(~valid, float("-inf")), dim=-1)
            elif normalize == "level":
                logp = torch.log_softmax(head.apply(hidden, *level_rows[level]), dim=-1)
                logp = logp.gather(1, index.column[level][child])
            else:
                logp = torch.log_softmax(head.logits(hidden), dim=-1).gather(1, index.token[level][child])
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
                    hidden = state.advance(src, index.token[level][nodes], new_width != width, need)
                else:
                    hidden = hidden.new_zeros(users * new_width, hidden.shape[-1])
            width = new_width
    finally:
        if was_training:
            model.train()

    items = index.items_of(nodes).view(users, width)
    scores = scores.view(users, width)
    if width < top_k:
        items = torch.cat([items, items.new_full((users, top_k - width), -1)], dim=1)
        scores = torch.cat([scores, scores.new_full((users, top_k - width), float("-inf"))], dim=1)
    items, scores = items[:, :top_k].clone(), scores[:, :top_k].clone()
    items[scores == float("-inf")] = -1
    return items, scores


# ---------------------------------------------------------------- reference
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
    from transformers import LogitsProcessor, LogitsProcessorList
    from transformers.generation.logits_process import PrefixConstrainedLogitsProcessor

    if normalize not in NORMALIZE:
        raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
    if not 1 <= top_k <= beam_size:
        raise ValueError(f"need 1 <= top_k <= beam_size, got top_k={top_k}, beam_size={beam_size}")
    users = input_ids.shape[0]
    prefix = _prefix_matrix(prefix_tokens, users, input_ids.device)
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
