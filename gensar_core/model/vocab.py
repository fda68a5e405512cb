"""The model's extra vocabulary: identifier tokens and the three behaviour tokens.

Every identifier token of the configured quantiser (`naming.vocabulary`) and the behaviour tokens
`<rec_item>`, `<src_query>`, `<src_item>` are added to the backbone's tokenizer as single tokens
(docs/method.md "The generative model and its tasks"). They are added as ordinary (non-special) tokens, so decoding with
`skip_special_tokens=True` keeps them, with `lstrip=True` so a space written before one is
absorbed into it rather than becoming a token of its own.
"""
from __future__ import annotations

from tokenizers import AddedToken

from gensar_core.config import IdentifierConfig, PipelineConfig
from gensar_core.identifiers.naming import vocabulary
from gensar_core.identifiers.sizing import resolved_identifiers

REC_ITEM = "<rec_item>"
SRC_QUERY = "<src_query>"
SRC_ITEM = "<src_item>"
BEHAVIOUR_TOKENS = (REC_ITEM, SRC_QUERY, SRC_ITEM)


def identifier_tokens(icfg: IdentifierConfig) -> list[str]:
    return vocabulary(icfg.shared_levels, icfg.specific_levels, icfg.codebook_size)


def added_tokens(cfg: PipelineConfig | IdentifierConfig) -> list[str]:
    """Behaviour tokens then every identifier token, in a stable order (an `auto` codebook size
    is the one of the warehouse's identifiers)."""
    if isinstance(cfg, PipelineConfig):
        icfg = resolved_identifiers(cfg)
    else:
        icfg = cfg
    return list(BEHAVIOUR_TOKENS) + identifier_tokens(icfg)


def add_vocabulary(tokenizer, tokens: list[str]) -> list[int]:
    """Add `tokens` as single tokens (idempotent); returns their ids, in order."""
    have = tokenizer.get_vocab()
    missing = [t for t in tokens if t not in have]
    if missing:
        tokenizer.add_tokens([AddedToken(t, lstrip=True, rstrip=False, normalized=False, special=False)
                              for t in missing])
    ids = tokenizer.convert_tokens_to_ids(tokens)
    for tok, i in zip(tokens, ids):
        if i is None or i == tokenizer.unk_token_id:
            raise ValueError(f"token {tok!r} could not be added to the tokenizer")
    return ids


def check_single_tokens(tokenizer, tokens: list[str]) -> None:
    """Raise unless every token encodes to exactly one id."""
    bad = [t for t in tokens if len(tokenizer(t, add_special_tokens=False)["input_ids"]) != 1]
    if bad:
        raise ValueError(f"{len(bad)} tokens are not single tokens, e.g. {bad[:5]}")
