"""Real tiny training runs: scratch T5 and a local decoder-only model, resume, early stopping, MLflow."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from gensar_core import tracking
from gensar_core.config import PipelineConfig, PromptedModelConfig
from gensar_core.model.backbone import load_backbone, load_trained
from gensar_core.model.corpus import read_corpus, run_build_corpus
from gensar_core.model.data import IGNORE, encode_examples
from toy_warehouse import write_toy_warehouse
from gensar_core.model.prompted_train import epoch_order, run_slug, run_train
from gensar_core.model.training import lr_at

SCRATCH = {"d_model": 64, "d_ff": 128, "d_kv": 16, "num_heads": 4, "num_layers": 1, "num_decoder_layers": 1,
           "dropout": 0.1, "tokenizer_vocab_size": 400}


@pytest.fixture(autouse=True, scope="module")
def module_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("gensar_home")
    old = os.environ.get("GENSAR_HOME")
    os.environ["GENSAR_HOME"] = str(home)  # one MLflow sqlite store for the module
    yield home
    if old is None:
        os.environ.pop("GENSAR_HOME", None)
    else:
        os.environ["GENSAR_HOME"] = old


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    """A toy warehouse with its corpus built; tests copy it."""
    root = tmp_path_factory.mktemp("toy") / "warehouse"
    write_toy_warehouse(root, n_users=24, n_items=30, events_per_user=10, seed=1)
    run_build_corpus(make_cfg(root))
    return root


def make_cfg(wh, train=None, model=None, **extra) -> PipelineConfig:
    """A prompted config; `train` may name the shared `train` settings and the recipe's own
    (`model.prompted`: batch_size, save_every, metric, ...), `model` the recipe's model settings."""
    train = {"epochs": 3, "batch_size": 16, "lr": 3e-3, "warmup_steps": 5, "eval_every": 10,
             "save_every": 10, "log_every": 5, "progress": False, "patience": 0, **(train or {})}
    own = set(PromptedModelConfig.model_fields)
    prompted = {"scratch": SCRATCH, "max_input_length": 128, **(model or {}),
                **{k: v for k, v in train.items() if k in own}}
    tree = {"warehouse": str(wh), "identifiers": {"codebook_size": 8},
            "model": {"formulation": "prompted", "prompted": prompted},
            "train": {k: v for k, v in train.items() if k not in own}}
    tree.update(extra)
    return PipelineConfig.model_validate(tree)


def copy_of(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


class LossRecorder:
    def __init__(self):
        self.losses = []

    def __call__(self, event, state):
        if event == "step":
            self.losses.append(state.last_loss)


def falls(losses, factor=0.75):
    head, tail = np.mean(losses[:5]), np.mean(losses[-10:])
    return tail < factor * head, (head, tail)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A random-init Llama with its own BPE tokenizer, saved as an ordinary HF folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-llama")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    words = ["user history recommend next item search query find the which what predict click", "action comedy drama "
             "horror romance thriller river night star city ghost king storm garden island mirror train winter"]
    tok.train_from_iterator(words * 20, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                            show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
                         pad_token_id=fast.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


# ---------------------------------------------------------------- pieces
def test_lr_schedule_and_epoch_mix():
    f = [lr_at(s, 100, 1.0, 10, "cosine", 0.1) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0) and f[10] == pytest.approx(1.0)
    assert f[-1] == pytest.approx(0.1, abs=0.01) and all(a >= b for a, b in zip(f[10:], f[11:]))
    assert lr_at(50, 100, 2.0, 0, "linear", 0.0) == pytest.approx(1.0)
    assert lr_at(50, 100, 2.0, 10, "constant") == 2.0 and lr_at(4, 100, 2.0, 10, "constant") == pytest.approx(1.0)
    idx = {"rec": np.arange(100), "align": np.arange(100, 120)}
    order = epoch_order(idx, {"rec": 0.5, "align": 2.0}, seed=1, epoch=0)
    assert len(order) == 50 + 40 and (order >= 100).sum() == 40 and len(set(order[order < 100])) == 50
    assert (order == epoch_order(idx, {"rec": 0.5, "align": 2.0}, seed=1, epoch=0)).all()
    assert not (order == epoch_order(idx, {"rec": 0.5, "align": 2.0}, seed=1, epoch=1)).all()
    assert run_slug("t5-scratch|rec+search") == "t5-scratch__rec+search"


def test_decoder_only_masks_the_prompt(toy_root, tiny_llama):
    cfg = make_cfg(toy_root, model={"backbone": "local", "path": str(tiny_llama)})
    bb = load_backbone(cfg)
    assert bb.kind == "causal" and bb.label == tiny_llama.name
    tok = bb.tokenizer
    assert bb.base_model.get_input_embeddings().weight.shape[0] >= len(tok) > 300
    enc = encode_examples(tok, "causal", ["User history: (none). Recommend the next item."],
                          ["<rec_item><a_1><b_2><c_3><d_4>"], 64, 16)
    ids, labels = enc.input_ids[0].tolist(), enc.labels[0].tolist()
    assert len(ids) == len(labels) and ids[0] == tok.bos_token_id
    n_prompt = sum(1 for x in labels if x == IGNORE)
    target = [x for x in labels if x != IGNORE]
    assert ids[n_prompt:] == target and target[-1] == tok.eos_token_id
    assert tok.convert_ids_to_tokens(target[:-1]) == ["<rec_item>", "<a_1>", "<b_2>", "<c_3>", "<d_4>"]
    # long prompts keep BOS and their last tokens
    enc = encode_examples(tok, "causal", ["word " * 200 + "Recommend."], ["<rec_item>"], 32, 8)
    assert len(enc.input_ids[0]) == 32 + 2 and enc.input_ids[0][0] == tok.bos_token_id
    seq = encode_examples(tok, "seq2seq", ["x"], ["<src_item><a_1>"], 8, 8)
    assert seq.labels[0][-1] == tok.eos_token_id and IGNORE not in seq.labels[0].tolist()


# ---------------------------------------------------------------- real runs
def test_scratch_t5_loss_falls_and_mlflow_records_the_run(toy_root, tmp_path):
    wh = copy_of(toy_root, tmp_path / "wh")
    cfg = make_cfg(wh)
    rec = LossRecorder()
    result = run_train(cfg, callbacks=[rec])
    ok, (head, tail) = falls(rec.losses)
    assert ok, f"train loss did not fall: {head:.3f} -> {tail:.3f}"
    evals = json.loads((Path(result["model_dir"]) / "train_history.json").read_text())["evals"]
    assert evals[-1]["valid/loss"] < evals[0]["valid/loss"]
    assert {"valid/rec/loss", "valid/search/loss", "valid/query/loss"} <= set(evals[0])
    assert result["run_name"] == "t5-scratch|rec+search+query+adhoc+align"
    assert result["kind"] == "seq2seq" and result["steps"] == result["total_steps"] > 30

    # the written model: weights, tokenizer, metadata; loads back for decoding
    out = Path(result["model_dir"])
    assert out == wh / "models" / run_slug(result["run_name"])
    assert {"model.safetensors", "config.json", "tokenizer.json", "gensar_model.json"} <= {p.name for p in out.iterdir()}
    assert not (wh / "checkpoints" / out.name).exists()  # checkpoints go once the model is committed
    bb = load_trained(out)
    assert bb.kind == "seq2seq" and len(bb.tokenizer("<src_item>", add_special_tokens=False)["input_ids"]) == 1
    # every train example once an epoch: the tokens counted are the corpus's encoder and decoder
    # tokens, three times, and the throughput is that count over the loop's time
    corpus, _ = read_corpus(cfg, result["tasks"])
    rows = corpus[corpus["split"] == "train"]
    enc = encode_examples(bb.tokenizer, "seq2seq", rows["input_text"].tolist(), rows["target_text"].tolist(),
                          cfg.model.prompted.max_input_length, cfg.model.prompted.max_target_length)
    assert result["tokens"] == 3 * sum(len(a) + len(b) for a, b in zip(enc.input_ids, enc.labels))
    assert result["train/tokens_per_s"] == pytest.approx(result["tokens"] / result["loop_seconds"], rel=0.01)
    meta = json.loads((out / "gensar_model.json").read_text())
    assert meta["tasks"] == ["rec", "search", "query", "adhoc", "align"] and meta["identifiers"]["codebook_size"] == 8

    # MLflow: params (flattened config), metrics per step, artifacts
    run = tracking.get_run(cfg, result["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == result["run_name"]
    params = run.data.params
    assert params["train.lr"] == "0.003" and params["model.prompted.backbone"] == "t5-scratch"
    assert params["corpus.tasks.rec.enabled"] == "True" and params["derived.kind"] == "seq2seq"
    assert run.data.tags["gensar.tasks"] == "rec+search+query+adhoc+align"
    losses = tracking.metric_history(cfg, result["mlflow_run_id"], "train/loss")
    assert len(losses) >= result["steps"] // 5 and losses[-1][1] < losses[0][1]
    assert len(tracking.metric_history(cfg, result["mlflow_run_id"], "valid/loss")) == len(evals)
    assert tracking.metric_history(cfg, result["mlflow_run_id"], "valid/rec/loss")
    files = tracking.list_artifacts(cfg, result["mlflow_run_id"])
    assert {"model/model.safetensors", "model/tokenizer.json", "tokenizer/tokenizer.json",
            "corpus/_manifest.json"} <= set(files)
    assert any(f.startswith("identifiers/items/") and f.endswith(".parquet") for f in files)


def test_decoder_only_local_model_loss_falls(toy_root, tiny_llama, tmp_path):
    wh = copy_of(toy_root, tmp_path / "wh")
    cfg = make_cfg(wh, model={"backbone": "local", "path": str(tiny_llama)},
                   train={"epochs": 2, "lr": 2e-3, "eval_every": 0, "save_every": 1000})
    rec = LossRecorder()
    result = run_train(cfg, callbacks=[rec])
    ok, (head, tail) = falls(rec.losses)
    assert ok, f"train loss did not fall: {head:.3f} -> {tail:.3f}"
    assert result["kind"] == "causal" and result["run_name"].startswith(f"{tiny_llama.name}|")
    bb = load_trained(result["model_dir"])
    assert bb.kind == "causal"
    assert bb.model.get_input_embeddings().weight.shape[0] == len(bb.tokenizer)


def test_resume_after_a_crash_gives_the_same_model(toy_root, tmp_path):
    train = {"epochs": 2, "eval_every": 4, "save_every": 4}
    straight_wh = copy_of(toy_root, tmp_path / "a")
    straight = run_train(make_cfg(straight_wh, train=train))

    crash_wh = copy_of(toy_root, tmp_path / "b")
    cfg = make_cfg(crash_wh, train=train)

    def crash(event, state):
        if event == "step" and state.step == 10:
            raise RuntimeError("power cut")

    with pytest.raises(RuntimeError, match="power cut"):
        run_train(cfg, callbacks=[crash])
    ckpts = sorted(p.name for p in (crash_wh / "checkpoints").iterdir() if p.is_dir())
    slug = run_slug(straight["run_name"])
    saved = sorted(p.name for p in (crash_wh / "checkpoints" / slug).iterdir())
    assert ckpts == [slug] and "step-00000008" in saved and "step-00000010" not in saved
    assert not (crash_wh / "models" / slug).exists()  # nothing half-written
    failed = tracking.find_runs(cfg, "attributes.status = 'FAILED'")
    assert failed

    resumed = run_train(cfg)
    assert resumed["resumed_from_step"] == 8
    assert resumed["steps"] == straight["steps"]
    assert resumed["mlflow_run_id"] in {r.info.run_id for r in failed}  # the same MLflow run, continued
    assert tracking.get_run(cfg, resumed["mlflow_run_id"]).info.status == "FINISHED"
    assert resumed["train/final_loss"] == pytest.approx(straight["train/final_loss"], rel=0, abs=0)
    assert resumed["best_metric"] == pytest.approx(straight["best_metric"], rel=0, abs=0)
    a = load_file(straight_wh / "models" / slug / "model.safetensors")
    b = load_file(crash_wh / "models" / slug / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # a changed config does not resume from stale checkpoints
    with pytest.raises(RuntimeError):
        run_train(cfg, callbacks=[crash])
    steps = []
    fresh = run_train(make_cfg(crash_wh, train={**train, "lr": 1e-3, "max_steps": 2}),
                      callbacks=[lambda event, state: steps.append(state.step) if event == "step" else None])
    assert fresh["resumed_from_step"] is None and steps == [1, 2]


def test_early_stopping_keeps_the_best_weights(toy_root, tmp_path):
    wh = copy_of(toy_root, tmp_path / "wh")
    seen = {}

    def fake_metric(ctx):
        # gets worse after the first evaluation: the model of that step must be the one written
        if not seen:
            seen["weights"] = {k: v.detach().clone() for k, v in ctx.model.state_dict().items()}
        seen["n"] = seen.get("n", 0) + 1
        return {"valid/fake@5": float(seen["n"]), "valid/other": 1.0}

    cfg = make_cfg(wh, train={"epochs": 5, "eval_every": 3, "metric": "valid/fake@5", "metric_mode": "min",
                              "patience": 2, "save_every": 100})
    result = run_train(cfg, evaluators=[fake_metric])
    assert result["stopped_early"] and result["steps"] == 9 and result["best_step"] == 3
    assert result["best_metric"] == 1.0
    final = load_file(Path(result["model_dir"]) / "model.safetensors")
    for k, v in final.items():
        assert torch.equal(v, seen["weights"][k]), k
    assert tracking.metric_history(cfg, result["mlflow_run_id"], "valid/fake@5")

    with pytest.raises(KeyError, match="valid/nope"):
        run_train(make_cfg(wh, train={"metric": "valid/nope", "max_steps": 2, "eval_every": 1}))


def test_lora_on_a_local_model(toy_root, tiny_llama, tmp_path):
    wh = copy_of(toy_root, tmp_path / "wh")
    cfg = make_cfg(wh, model={"backbone": "local", "path": str(tiny_llama), "lora": {"enabled": True, "r": 8}},
                   train={"epochs": 1, "max_steps": 12, "lr": 5e-3, "eval_every": 0, "save_every": 100})
    bb = load_backbone(cfg)
    trainable = {n for n, p in bb.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "trainable_tokens" in n for n in trainable)
    rec = LossRecorder()
    result = run_train(cfg, callbacks=[rec])
    assert result["backbone"].endswith("-lora") and np.mean(rec.losses[-4:]) < np.mean(rec.losses[:4])
    merged = load_trained(result["model_dir"])  # adapters merged: a plain model folder
    assert not any("lora" in n for n, _ in merged.model.named_parameters())


def test_training_needs_a_corpus_with_the_enabled_tasks(toy_root, tmp_path):
    wh = copy_of(toy_root, tmp_path / "wh")
    run_build_corpus(make_cfg(wh, corpus={"tasks": {"align": {"enabled": False}}}))
    with pytest.raises(ValueError, match="align"):
        run_train(make_cfg(wh, train={"max_steps": 1}))
    only = make_cfg(wh, corpus={"tasks": {"align": {"enabled": False}, "adhoc": {"enabled": False},
                                          "query": {"enabled": False}}}, train={"max_steps": 3, "eval_every": 0})
    result = run_train(only)
    assert result["run_name"] == "t5-scratch|rec+search" and result["tasks"] == ["rec", "search"]


def test_a_trained_seq2seq_folder_is_a_local_backbone(toy_root, tmp_path):
    """models/<run>/ is an ordinary HF folder: training can continue from it through `local`."""
    wh = copy_of(toy_root, tmp_path / "wh")
    first = run_train(make_cfg(wh, train={"max_steps": 3, "eval_every": 0}))
    cfg = make_cfg(wh, model={"backbone": "local", "path": first["model_dir"]},
                   train={"max_steps": 3, "eval_every": 0, "run_name": "continued"})
    bb = load_backbone(cfg)
    assert bb.kind == "seq2seq" and len(bb.tokenizer) == bb.base_model.get_input_embeddings().weight.shape[0]
    result = run_train(cfg)
    assert result["kind"] == "seq2seq" and Path(result["model_dir"]).name == "continued"
