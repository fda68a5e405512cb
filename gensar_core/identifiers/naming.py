"""Token names of the dual-purpose identifiers.

One token per quantiser level, written `<{letter}_{code}>`. The letters come from the level
counts alone, so any config names its tokens the same way everywhere:

- shared levels use the letters from `a` on:                 a, b, ...
- collaborative levels continue right after the shared ones: c, d, ... (for 2 shared levels)
- semantic levels start at `s`:                              s, t, ...

With the paper's 2 shared + 2 specific levels this gives the paper's own notation:
semantic ID `<a_i><b_j><s_k><t_l>`, collaborative ID `<a_i><b_j><c_k><d_l>`.
The three letter sets never overlap: shared + specific levels must fit in `a`..`r` (18 letters)
and specific levels in `s`..`z` (8 letters); more levels than that raise ValueError.
"""
from __future__ import annotations

import re
import string
from dataclasses import dataclass

_LETTERS = string.ascii_lowercase
_SEMANTIC_START = _LETTERS.index("s")
_TOKEN = re.compile(r"<([a-z])_(\d+)>")


@dataclass(frozen=True)
class TokenLetters:
    shared: tuple[str, ...]
    semantic: tuple[str, ...]
    collaborative: tuple[str, ...]

    @property
    def semantic_id(self) -> tuple[str, ...]:
        """Letters of a full semantic ID, level by level."""
        return self.shared + self.semantic

    @property
    def collaborative_id(self) -> tuple[str, ...]:
        return self.shared + self.collaborative


def token_letters(shared_levels: int, specific_levels: int) -> TokenLetters:
    if shared_levels < 1 or specific_levels < 1:
        raise ValueError("need at least one shared and one specific level")
    if shared_levels + specific_levels > _SEMANTIC_START:
        raise ValueError(
            f"{shared_levels} shared + {specific_levels} specific levels do not fit the "
            f"letters a..r of shared and collaborative tokens (at most {_SEMANTIC_START})"
        )
    if specific_levels > len(_LETTERS) - _SEMANTIC_START:
        raise ValueError(f"{specific_levels} specific levels do not fit the letters s..z")
    shared = tuple(_LETTERS[:shared_levels])
    collaborative = tuple(_LETTERS[shared_levels : shared_levels + specific_levels])
    semantic = tuple(_LETTERS[_SEMANTIC_START : _SEMANTIC_START + specific_levels])
    return TokenLetters(shared=shared, semantic=semantic, collaborative=collaborative)


def format_id(codes, letters: tuple[str, ...]) -> str:
    """`[3, 7, 1, 0]` + `(a, b, s, t)` -> `<a_3><b_7><s_1><t_0>`."""
    codes = [int(c) for c in codes]
    if len(codes) != len(letters):
        raise ValueError(f"{len(codes)} codes for {len(letters)} levels")
    return "".join(f"<{letter}_{code}>" for letter, code in zip(letters, codes))


def parse_id(identifier: str) -> list[tuple[str, int]]:
    """`<a_3><b_7>...` -> `[('a', 3), ('b', 7), ...]`; raises ValueError on anything else."""
    tokens = _TOKEN.findall(identifier)
    if "".join(f"<{l}_{c}>" for l, c in tokens) != identifier or not tokens:
        raise ValueError(f"not an identifier: {identifier!r}")
    return [(letter, int(code)) for letter, code in tokens]


def vocabulary(shared_levels: int, specific_levels: int, codebook_size: int) -> list[str]:
    """Every identifier token a model needs in its vocabulary, in a stable order."""
    letters = token_letters(shared_levels, specific_levels)
    ordered = letters.shared + letters.collaborative + letters.semantic
    return [f"<{letter}_{code}>" for letter in ordered for code in range(codebook_size)]
