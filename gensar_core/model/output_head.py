"""The model's output layer as a plain (scaled) linear map, so the decoder can multiply only the
rows of the tokens a step can emit."""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from gensar_core.model.onednn import dense, onednn_applies

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
        return (dense(hidden, weight, bias) if onednn_applies(hidden) else F.linear(hidden, weight, bias)).float()
