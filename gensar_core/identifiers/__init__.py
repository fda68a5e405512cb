"""Dual-purpose item identifiers (docs/method.md "Dual-purpose identifiers").

    quantiser.py   DualQuantiser (+ the plain single-ID baseline) and train_quantiser
    assign.py      collision reduction, the uniqueness rule, report, cold start
    naming.py      token names `<a_i><b_j><s_k><t_l>` / `<a_i><b_j><c_k><d_l>`
    checkpoint.py  safetensors + JSON save / load
    step.py        run_learn_identifiers, the pipeline step
"""
from gensar_core.identifiers.assign import (
    Assignment,
    assign_cold_start,
    assign_identifiers,
    identifier_table,
)
from gensar_core.identifiers.checkpoint import load_quantiser, save_quantiser
from gensar_core.identifiers.naming import format_id, parse_id, token_letters, vocabulary
from gensar_core.identifiers.quantiser import (
    DualQuantiser,
    PlainResidualQuantiser,
    QuantiserSpec,
    train_quantiser,
)
from gensar_core.identifiers.step import run_learn_identifiers

__all__ = [
    "Assignment", "DualQuantiser", "PlainResidualQuantiser", "QuantiserSpec",
    "assign_cold_start", "assign_identifiers", "format_id", "identifier_table", "load_quantiser",
    "parse_id", "run_learn_identifiers", "save_quantiser", "token_letters", "train_quantiser",
    "vocabulary",
]
