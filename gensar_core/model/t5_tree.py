"""T5 / mT5's decoder over a beam tree (one row per input), with its encoder packed (no work on
padding) and its matmuls through oneDNN; scores equal `generate`'s."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from gensar_core.model.beam_tree import BeamTree, additive, spread, unpack
from gensar_core.model.onednn import linear


def t5_feed_forward(layer, h: Tensor) -> Tensor:
    """T5's feed-forward layer (`T5LayerFF`: norm, MLP, residual; plain or gated as in mT5) with
    its matmuls through `_linear`; dropout is off in evaluation."""
    mlp = layer.DenseReluDense
    x = layer.layer_norm(h)
    if hasattr(mlp, "wi_0"):
        x = mlp.act(linear(mlp.wi_0, x)) * linear(mlp.wi_1, x)
    elif isinstance(mlp.act, torch.nn.ReLU):  # T5's own: fused into the matmul
        x = linear(mlp.wi, x, post="relu")
    else:
        x = mlp.act(linear(mlp.wi, x))
    return h + linear(mlp.wo, x)


class T5TreeState:
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
        self.enc_mask = additive(attention_mask.bool()[:, None, None, :], self.dtype)  # [users, 1, 1, S]
        enc, where = self._encode(model.get_encoder(), input_ids, self.enc_mask)
        cross = [block.layer[1].EncDecAttention for block in self.decoder.block]
        self.cross = [(self._heads(unpack(linear(att.k, enc), where, input_ids.shape)),
                       self._heads(unpack(linear(att.v, enc), where, input_ids.shape))) for att in cross]
        self.keys: list = [None] * len(self.decoder.block)
        self.values: list = [None] * len(self.decoder.block)
        start = config.decoder_start_token_id if config.decoder_start_token_id is not None else config.pad_token_id
        starts = torch.full((self.users, 1), int(start), dtype=torch.long, device=input_ids.device)
        self.first = torch.cat([starts, prefix], dim=1)
        self.trunk = self.first.shape[1]  # start + prefix tokens, seen by every beam
        self.tree = BeamTree(self.users, input_ids.device)

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
            q, k, v = (self._heads(unpack(linear(proj, x), where, shape)) for proj in (att.q, att.k, att.v))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
            h = h + linear(att.o, out.transpose(1, 2).reshape(shape.numel(), -1).index_select(0, where))
            h = t5_feed_forward(block.layer[-1], h)
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
        bias = self._position_bias(depth, depth) + additive(causal, self.dtype)
        return self._run(self.first, bias)[:, -1]

    def advance(self, src_rows: Tensor, tokens: Tensor, rows_changed: bool,
                need: Optional[Tensor] = None) -> Tensor:
        seen, tokens, pick = self.tree.step(src_rows, tokens, need)  # [users, n, generated slots]
        users, n = tokens.shape
        depth = self.key_depth[-1:] + 1
        self.key_depth = torch.cat([self.key_depth, depth.expand(n)])
        trunk = seen.new_ones(users, n, self.trunk)
        visible = torch.cat([trunk, seen], dim=2)[:, None]  # [users, 1, n, keys]
        bias = self._position_bias(depth, self.key_depth) + additive(visible, self.dtype)
        return spread(self._run(tokens, bias), pick, src_rows.numel() // users)

    def _run(self, ids: Tensor, self_bias: Tensor) -> Tensor:
        users, n = ids.shape
        h = self.decoder.embed_tokens(ids)
        for i, block in enumerate(self.decoder.block):
            sa, ca, ff = block.layer[0], block.layer[1], block.layer[-1]
            att = sa.SelfAttention
            x = sa.layer_norm(h)
            k, v = self._heads(linear(att.k, x)), self._heads(linear(att.v, x))
            if self.keys[i] is not None:
                k, v = torch.cat([self.keys[i], k], dim=2), torch.cat([self.values[i], v], dim=2)
            self.keys[i], self.values[i] = k, v
            out = F.scaled_dot_product_attention(self._heads(linear(att.q, x)), k, v, attn_mask=self_bias, scale=1.0)
            h = h + linear(att.o, out.transpose(1, 2).reshape(users, n, -1))
            att = ca.EncDecAttention
            x = ca.layer_norm(h)
            q = self._heads(linear(att.q, x))
            out = F.scaled_dot_product_attention(q, *self.cross[i], attn_mask=self.enc_mask, scale=1.0)
            h = h + linear(att.o, out.transpose(1, 2).reshape(users, n, -1))
            h = t5_feed_forward(ff, h)
        return self.decoder.final_layer_norm(h)
