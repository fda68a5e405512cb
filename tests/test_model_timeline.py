"""The timeline formulation: token layout, loss mask, windows, prompts."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gensar_core.model.prompts import ItemIds
from gensar_core.model.timeline import (BOS, GIVEN, IGNORE, QUERY, REC_ID, SEARCH_ID, TimelineCodec, batches,
                                        build_tokenizer, collate_windows, supervised_kinds, training_windows)
from gensar_core.model.vocab import REC_ITEM, SRC_ITEM, SRC_QUERY

IDS = {"i1": ItemIds("<a_0><b_1><s_2><t_3>", "<a_0><b_1><c_4><d_5>"),
       "i2": ItemIds("<a_1><b_0><s_0><t_0>", "<a_1><b_0><c_0><d_0>")}
TOKENS = sorted({f"<{x}_{n}>" for x in "abcdst" for n in range(6)})


def codec():
    tok = build_tokenizer(["Action crime", "drama", "action"], TOKENS)
    return tok, TimelineCodec.of(tok, IDS)


def mixed_windows_and_model(max_len: int):
    """Training windows of a 12-event timeline of both behaviours plus one ad-hoc window, and a
    seeded one-layer Llama over their vocabulary: (tokenizer, windows, model)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok, c = codec()
    events = [{"behavior": "search" if k % 3 == 0 else "rec", "item_id": "i1" if k % 2 else "i2",
               "query": "action crime"} for k in range(12)]
    windows = training_windows([c.timeline(events)], max_len=max_len, rng=np.random.default_rng(0))
    windows.append(c.adhoc("drama", "i1"))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    return tok, windows, model


def test_events_are_written_in_the_papers_tokens_with_loss_on_ids_and_query_words():
    tok, c = codec()
    events = [{"behavior": "rec", "item_id": "i1", "query": None},
              {"behavior": "search", "item_id": "i2", "query": "Action drama"},
              {"behavior": "rec", "item_id": "unknown", "query": None}]
    ids, sup, starts = c.timeline(events)
    words = tok.convert_ids_to_tokens(ids.tolist())
    assert words == [REC_ITEM, "<a_0>", "<b_1>", "<c_4>", "<d_5>",
                     SRC_QUERY, "action", "drama", SRC_ITEM, "<a_1>", "<b_0>", "<s_0>", "<t_0>"]
    assert sup.tolist() == [GIVEN] + [REC_ID] * 4 + [GIVEN] + [QUERY] * 3 + [SEARCH_ID] * 4
    assert starts.tolist() == [0, 5]  # the unknown item is left out


def test_prompt_round_trips_through_the_tokenizer_and_keeps_whole_recent_events():
    tok, c = codec()
    events = [{"behavior": "rec", "item_id": "i1", "query": None}] * 10
    text = c.prompt(events, "search", "crime", max_len=20)
    words = tok.convert_ids_to_tokens(tok(text)["input_ids"])
    assert words[0] == BOS and words[-2:] == [SRC_QUERY, "crime"]
    assert len(words) <= 20 - 5 and (len(words) - 3) % 5 == 0 and words[1] == REC_ITEM


def test_windows_cover_every_event_once_and_fit():
    tok, c = codec()
    events = [{"behavior": "search" if k % 3 == 0 else "rec", "item_id": "i1" if k % 2 else "i2",
               "query": "action crime"} for k in range(40)]
    timeline = c.timeline(events)
    rng = np.random.default_rng(0)
    windows = training_windows([timeline], max_len=32, rng=rng)
    assert all(len(w) <= 32 and w[0] == tok.bos_token_id for w, _, _ in windows)
    supervised = sum(int((lab != IGNORE).sum()) for _, lab, _ in windows)
    assert supervised == int((timeline[1] != GIVEN).sum())
    rec_only = training_windows([timeline], max_len=32, rng=rng, kinds=supervised_kinds(["rec"]))
    rec_tokens = {tok.convert_tokens_to_ids(t) for t in ["<c_4>", "<d_5>", "<c_0>", "<d_0>", "<a_0>", "<a_1>",
                                                          "<b_0>", "<b_1>"]}
    assert all(set(lab[lab != IGNORE].tolist()) <= rec_tokens for _, lab, _ in rec_only)
    assert sum(int((lab != IGNORE).sum()) for _, lab, _ in rec_only) == int((timeline[1] == REC_ID).sum())
    assert all(((lab == IGNORE) | (lab == w)).all() and len(kind) == len(w) for w, lab, kind in windows)
    order = batches(windows, tokens_per_batch=64, rng=rng)
    assert sorted(i for b in order for i in b) == list(range(len(windows)))
    batch = collate_windows(windows, order[0])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape


def test_adhoc_window_supervises_the_semantic_id_only():
    tok, c = codec()
    window, labels, _ = c.adhoc("drama", "i1")
    assert tok.convert_ids_to_tokens(window.tolist())[:4] == [BOS, SRC_QUERY, "drama", SRC_ITEM]
    assert tok.convert_ids_to_tokens(labels[labels != IGNORE].tolist()) == ["<a_0>", "<b_1>", "<s_2>", "<t_3>"]


def test_loss_weights_weigh_each_token_kinds_share_of_the_loss():
    """Equal weights are Hugging Face's own mean over supervised tokens; query 0.25 is the
    weighted mean of the per-kind cross-entropy sums, by hand."""
    import torch

    from gensar_core.model.timeline import kind_weights
    from gensar_core.model.timeline_train import token_loss

    tok, windows, model = mixed_windows_and_model(max_len=32)
    index = list(range(len(windows)))
    assert kind_weights() is None and kind_weights(2.0, 2.0, 2.0) is None
    assert kind_weights(search=2.0, kinds=(REC_ID,)) is None  # one kind: the plain mean
    assert kind_weights(search=2.0, kinds=(REC_ID, SEARCH_ID)).tolist() == [0, 1, 1, 2, 1]
    plain = token_loss(model, collate_windows(windows, index, tok.pad_token_id))
    ones = token_loss(model, collate_windows(windows, index, tok.pad_token_id, np.array([0, 1, 1, 1], np.float32)))
    assert torch.allclose(plain, ones, atol=1e-6)

    batch = collate_windows(windows, index, tok.pad_token_id)
    kinds = np.full(batch["labels"].shape, GIVEN)
    for r, (_, _, kind) in enumerate(windows):
        kinds[r, :len(kind)] = kind
    kinds[batch["labels"].numpy() == IGNORE] = GIVEN  # the ad-hoc window's query is given, not a target
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits[:, :-1]
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["labels"][:, 1:], reduction="none")
    by_kind = {k: (float(ce[torch.from_numpy(kinds[:, 1:] == k)].sum()), int((kinds[:, 1:] == k).sum()))
               for k in (REC_ID, QUERY, SEARCH_ID)}
    assert all(n for _, n in by_kind.values())
    want = ((by_kind[REC_ID][0] + by_kind[SEARCH_ID][0] + 0.25 * by_kind[QUERY][0])
            / (by_kind[REC_ID][1] + by_kind[SEARCH_ID][1] + 0.25 * by_kind[QUERY][1]))
    weighted = collate_windows(windows, index, tok.pad_token_id, kind_weights(query=0.25))
    assert float(token_loss(model, weighted)) == pytest.approx(want, rel=1e-5)


def test_padded_batch_shapes_are_few_and_leave_the_loss_unchanged():
    """pad_shape pads rows to a multiple of 8 and the width to a power of two (to 64) or a
    multiple of 64: the padding is after every real token, carries no label and no weight, so
    the plain and the weighted loss are those of the tight batch."""
    import torch

    from gensar_core.model.timeline import kind_weights, padded_shape
    from gensar_core.model.timeline_train import token_loss

    assert [padded_shape(r, w) for r, w in [(1, 1), (8, 9), (9, 64), (16, 65), (3, 512), (17, 500)]] == [
        (8, 8), (8, 16), (16, 64), (16, 128), (8, 512), (24, 512)]
    tok, windows, model = mixed_windows_and_model(max_len=40)
    index = list(range(len(windows)))
    for weights in (None, kind_weights(query=0.25)):
        tight = collate_windows(windows, index, tok.pad_token_id, weights)
        padded = collate_windows(windows, index, tok.pad_token_id, weights, pad_shape=True)
        assert tuple(padded["input_ids"].shape) == padded_shape(*tight["input_ids"].shape) != tuple(tight["input_ids"].shape)
        rows, width = tight["labels"].shape
        assert torch.equal(padded["labels"][:rows, :width], tight["labels"])
        assert (padded["labels"][rows:] == IGNORE).all() and (padded["labels"][:, width:] == IGNORE).all()
        with torch.no_grad():
            assert float(token_loss(model, padded)) == pytest.approx(float(token_loss(model, tight)), rel=1e-5)


# ---------------------------------------------------------------- a real tiny training run
def test_a_task_that_stops_gaining_on_valid_loses_loss_weight():
    """stale_task_decay: each validation a task does not beat its own best halves its weight;
    a single-task model has no other kind to shift weight to, so its loss stays the plain mean."""
    from types import SimpleNamespace

    from gensar_core.config import TimelineModelConfig
    from gensar_core.model.timeline_train import Progress, decay_stale_tasks, kind_loss_weights

    progress = Progress()
    for rec, search in [(0.05, 0.10), (0.08, 0.30), (0.07, 0.40), (0.06, 0.35), (0.09, 0.45)]:
        decay_stale_tasks(progress, {"valid/rec_ndcg@10": rec, "valid/search_ndcg@10": search}, 0.5)
    assert progress.task_scale == {"rec": 0.25, "search": 0.5}
    assert progress.task_best == {"rec": 0.09, "search": 0.45}
    off = Progress()
    decay_stale_tasks(off, {"valid/rec_ndcg@10": 0.1}, 1.0)
    decay_stale_tasks(off, {"valid/rec_ndcg@10": 0.0}, 1.0)
    assert off.task_scale == {}

    tcfg = TimelineModelConfig()
    joint = SimpleNamespace(kinds=(REC_ID, QUERY, SEARCH_ID), adhoc=[])
    w = tcfg.loss_weights
    assert kind_loss_weights(joint, tcfg, progress.task_scale).tolist() == [0, w.rec * 0.25, w.query, w.search * 0.5, w.align]
    assert kind_loss_weights(SimpleNamespace(kinds=(REC_ID,), adhoc=[]), tcfg, progress.task_scale) is None


@pytest.mark.parametrize("select,ema,decay,item_tokens", [("mean", None, 1.0, False), ("geomean", 0.9, 0.5, True)])
def test_training_keeps_the_best_validation_checkpoint_and_the_ranker_reads_whole_histories(tmp_path, monkeypatch,
                                                                                          select, ema, decay,
                                                                                          item_tokens):
    """The kept checkpoint is the best by the configured selection number; with a weight average
    it is the average that is validated and saved; with stale_task_decay each task's recorded
    loss scale halves at every validation it does not beat its own best; a model trained with
    item tokens and both IDs in its history ranks with them (its saved folder says so)."""
    import json

    from gensar_core.config import PipelineConfig, with_overrides
    from gensar_core.evaluate.context import EvalContext
    from gensar_core.model.generative_ranker import GenerativeRanker, ranker_settings
    from toy_warehouse import write_toy_warehouse
    from gensar_core.model.timeline_train import run_train_timeline
    from gensar_core.storage import Warehouse

    monkeypatch.setenv("GENSAR_HOME", str(tmp_path))
    root = tmp_path / "warehouse"
    write_toy_warehouse(root, n_users=24, n_items=30, events_per_user=12, seed=1)
    if item_tokens:  # the collaborative item vectors the item tokens start from
        from gensar_core.embed.vectors import vectors_table
        from gensar_core.storage import write_table

        write_table(vectors_table(np.arange(30), np.random.default_rng(0).normal(size=(30, 6)).astype(np.float32)),
                    root / "features" / "collaborative")
    cfg = PipelineConfig.model_validate({
        "warehouse": str(root), "identifiers": {"codebook_size": 8}, "tracking": {"enabled": False},
        "model": {"formulation": "timeline", "timeline": {"init_ids_from_codes": False, "max_len": 64, "d_model": 32, "d_ff": 64, "num_heads": 2,
                                                          "num_layers": 1, "tokens_per_batch": 512,
                                                          "select": select, "ema_decay": ema,
                                                          "stale_task_decay": decay, "item_tokens": item_tokens,
                                                          "history_ids": item_tokens}},
        "train": {"epochs": 4, "lr": 3e-3, "warmup_steps": 2, "eval_every": 3, "patience": 0, "progress": False},
        "evaluate": {"beam_size": 8}})
    result = run_train_timeline(cfg)
    folder = Path(result["model_dir"])
    history = json.loads((folder / "train_history.json").read_text())["evals"]
    key = {"mean": "valid/ndcg@10", "geomean": "valid/geomean_ndcg@10"}[select]
    best = max(history, key=lambda e: e[key])
    assert result["metric"] == key and result["best_step"] == best["step"] and result["best_metric"] == best[key]
    assert result["steps"] == result["total_steps"] and result["train/supervised_tokens_per_s"] > 0
    assert {"valid/rec_ndcg@10", "valid/search_ndcg@10"} <= set(best)
    for task in ("rec", "search"):
        scores = [e[f"valid/{task}_ndcg@10"] for e in history]
        stale = [sum(s <= max(scores[:i], default=-1) for i, s in enumerate(scores[:n + 1])) for n in range(len(history))]
        assert [e.get(f"train/{task}_loss_scale", 1.0) for e in history] == [decay ** k for k in stale]

    ids = Warehouse(root).read("identifiers/items")
    ranker = GenerativeRanker(folder, ids, **ranker_settings(cfg))
    assert ranker.timeline is not None and ranker.max_input == 64
    assert ranker.timeline.item_tokens == ranker.timeline.history_ids == item_tokens
    # model.timeline.prompt_tokens: prompts keep the last events that fit in fewer tokens
    short = GenerativeRanker(folder, ids, **ranker_settings(with_overrides(cfg, ["model.timeline.prompt_tokens=24"])))
    ctx = EvalContext(cfg)
    rec_cases = ctx.cases("test", "rec")
    widths = [short.encode(short.prompts(rec_cases, "rec"))[0].shape[1], ranker.encode(ranker.prompts(rec_cases, "rec"))[0].shape[1]]
    assert short.max_input == 24 and widths[0] <= 24 < widths[1] <= 64
    # model.timeline.extra_prompt_tokens: each model also reads the prompts cut to other lengths
    viewed = GenerativeRanker(folder, ids, **ranker_settings(with_overrides(
        cfg, ["model.timeline.extra_prompt_tokens=[24, 64, 100]"])))
    assert viewed.views == (64, 24) and "2 prompt lengths" in viewed.description
    assert ranker_settings(cfg, validation=True)["extra_prompt_tokens"] == []
    for task in ("rec", "search"):
        cases = ctx.cases("test", task)
        for model in (ranker, viewed):  # search with the rec prior (the default) too
            lists = model.rank(cases, task, 5)
            for items, banned in zip(lists, cases["exclude"]):
                assert len(items) == min(5, 30 - len(set(banned)))
                assert not set(items.tolist()) & set(banned.tolist())
    # the best weights are the ones saved: validating the saved model again gives its number
    from gensar_core.model.timeline_train import valid_cases, validate

    again = validate(GenerativeRanker(folder, ids, **ranker_settings(cfg, validation=True)), valid_cases(cfg, None))
    assert abs(again[key] - result["best_metric"]) < 1e-6


def test_every_train_seed_validates_on_the_same_cases(tmp_path):
    from gensar_core.config import PipelineConfig, with_overrides
    from gensar_core.model.timeline_train import valid_cases
    from toy_warehouse import write_toy_warehouse

    write_toy_warehouse(tmp_path / "wh", n_users=40, n_items=20, events_per_user=9, seed=2)
    cfg = PipelineConfig(warehouse=tmp_path / "wh")
    own, other = valid_cases(cfg, 5), valid_cases(with_overrides(cfg, ["train.seed=7"]), 5)
    for task, cases in own.items():
        assert len(cases) == 5 < len(valid_cases(cfg, None)[task])
        assert cases[["user_id", "target"]].equals(other[task][["user_id", "target"]])


def test_evaluation_cases_carry_the_whole_timeline_behind_seq(tmp_path):
    from gensar_core.config import PipelineConfig
    from gensar_core.evaluate.context import EvalContext
    from toy_warehouse import write_toy_warehouse

    write_toy_warehouse(tmp_path / "wh", n_users=12, n_items=20, events_per_user=9, seed=2)
    ctx = EvalContext(PipelineConfig(warehouse=tmp_path / "wh"))
    for split in ("valid", "test"):
        for task in ("rec", "search"):
            cases = ctx.cases(split, task)
            for timeline, seq in zip(cases["timeline"], cases["seq"]):
                assert [ctx.item_index[e["item_id"]] for e in timeline] == seq.tolist()
                assert all(e["behavior"] in ("rec", "search") for e in timeline)
                assert all(e["query"] for e in timeline if e["behavior"] == "search")


def test_identifier_embeddings_start_from_the_code_vectors():
    """Each ID token's row is its code vector through one orthonormal map a level: the inner
    products between a level's codes are kept (up to the level's scale)."""
    import torch

    from gensar_core.config import PipelineConfig
    from gensar_core.identifiers.quantiser import DualQuantiser, QuantiserSpec
    from gensar_core.model.timeline import build_tokenizer
    from gensar_core.model.timeline_train import build_model, init_id_embeddings
    from gensar_core.model.vocab import added_tokens

    cfg = PipelineConfig.model_validate({"identifiers": {"codebook_size": 8},
                                         "model": {"timeline": {"d_model": 32, "d_ff": 64, "num_heads": 2}}})
    quantiser = DualQuantiser(QuantiserSpec(semantic_dim=16, collaborative_dim=16, hidden_dims=(16,), latent_dim=4,
                                            codebook_size=8))
    torch.manual_seed(0)
    for stack in (quantiser.shared, quantiser.semantic, quantiser.collaborative):
        for codebook in stack.codebooks:
            codebook.data.normal_()
    tokenizer = build_tokenizer(["a query"], added_tokens(cfg))
    model = build_model(tokenizer, cfg.model, seed=0)
    assert init_id_embeddings(model, tokenizer, quantiser, seed=0) == 6 * 8  # 2 shared + 2 + 2 specific levels
    weight = model.get_input_embeddings().weight.detach()
    for letter, codebook in (("a", quantiser.shared.codebooks[0]), ("t", quantiser.semantic.codebooks[1]),
                             ("d", quantiser.collaborative.codebooks[1])):
        rows = weight[tokenizer.convert_tokens_to_ids([f"<{letter}_{c}>" for c in range(8)])]
        codes = codebook.detach()
        gram, code_gram = rows @ rows.T, codes @ codes.T
        torch.testing.assert_close(gram / gram.abs().max(), code_gram / code_gram.abs().max(), atol=1e-4, rtol=1e-4)


def test_code_vector_init_without_a_quantiser_names_the_step(tmp_path):
    from gensar_core.config import PipelineConfig
    from gensar_core.model.timeline_train import run_train_timeline
    from toy_warehouse import write_toy_warehouse

    write_toy_warehouse(tmp_path / "wh", n_users=12, n_items=20, events_per_user=9, seed=2)
    cfg = PipelineConfig.model_validate({"warehouse": str(tmp_path / "wh"), "identifiers": {"codebook_size": 8},
                                         "tracking": {"enabled": False}})
    with pytest.raises(FileNotFoundError, match="learn_identifiers"):
        run_train_timeline(cfg)


def test_residual_and_embedding_dropout_act_in_training_only():
    """Dropout hooks change the training forward pass (two passes differ) and leave the eval pass
    identical to the same model without them."""
    import torch

    from gensar_core.config import PipelineConfig
    from gensar_core.model.timeline import build_tokenizer
    from gensar_core.model.timeline_train import build_model
    from gensar_core.model.vocab import added_tokens

    small = {"d_model": 32, "d_ff": 64, "num_heads": 2}
    plain_cfg = PipelineConfig.model_validate({"identifiers": {"codebook_size": 8}, "model": {"timeline": small}})
    drop_cfg = PipelineConfig.model_validate({"identifiers": {"codebook_size": 8},
                                              "model": {"timeline": {**small, "resid_dropout": 0.3,
                                                                     "embed_dropout": 0.3}}})
    tokenizer = build_tokenizer(["a query"], added_tokens(plain_cfg))
    plain, dropped = build_model(tokenizer, plain_cfg.model, seed=0), build_model(tokenizer, drop_cfg.model, seed=0)
    ids = torch.arange(1, 9).unsqueeze(0)
    with torch.no_grad():
        dropped.train()
        assert not torch.equal(dropped(input_ids=ids).logits, dropped(input_ids=ids).logits)
        plain.eval(), dropped.eval()
        torch.testing.assert_close(dropped(input_ids=ids).logits, plain(input_ids=ids).logits)


def test_auto_precision_is_bf16_only_on_a_cpu_with_native_bf16(monkeypatch):
    """Emulated bf16 is slower than float32: `auto` autocasts only where the CPU computes bf16."""
    import torch
    import torch.cpu

    from gensar_core.model.timeline_train import autocast

    cpu = torch.device("cpu")
    for native in (False, True):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        with autocast(cpu, "auto"):
            assert torch.is_autocast_enabled("cpu") == (native and torch.backends.mkldnn.is_available())
    with autocast(cpu, "bf16"):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
    with autocast(cpu, "no"):
        assert not torch.is_autocast_enabled("cpu")


def test_weight_average_is_bias_corrected_and_restores_the_trained_weights():
    """The average of the trained weights alone (not of the random start), in the model inside the
    block and gone after it."""
    import torch

    from gensar_core.model.timeline_train import WeightAverage

    model = torch.nn.Linear(3, 2)
    average = WeightAverage(model, decay=0.9)
    seen = []
    for value in (1.0, 2.0, 4.0):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(value)
        average.update(model)
        seen.append(value)
    weights = torch.tensor([0.9 ** (len(seen) - 1 - i) for i in range(len(seen))])
    expected = float((weights * torch.tensor(seen)).sum() / weights.sum())
    with average.applied(model):
        for p in model.parameters():
            torch.testing.assert_close(p, torch.full_like(p, expected))
    for p in model.parameters():
        torch.testing.assert_close(p, torch.full_like(p, 4.0))


def test_searches_written_as_rec_clicks_add_rec_targets_only_when_rec_is_trained():
    from types import SimpleNamespace

    from gensar_core.config import TimelineModelConfig
    from gensar_core.model.timeline import searches_as_rec
    from gensar_core.model.timeline_train import epoch_windows

    tok, c = codec()
    events = [{"behavior": "search" if k % 2 else "rec", "item_id": "i1" if k % 3 else "i2",
               "query": "action crime" if k % 2 else None} for k in range(60)]
    rng = np.random.default_rng(0)
    assert searches_as_rec(events, 0.0, rng) == events
    flipped = searches_as_rec(events, 1.0, rng)
    assert [e["item_id"] for e in flipped] == [e["item_id"] for e in events]
    assert all(e["behavior"] == "rec" and e["query"] is None for e in flipped)

    def kind_counts(kinds, share):
        data = SimpleNamespace(timelines=[c.timeline(events)], events=[events], codec=c, kinds=kinds, adhoc=[])
        cfg = TimelineModelConfig(max_len=64, search_as_rec=share)
        labelled = [kind[lab != IGNORE] for _, lab, kind in epoch_windows(data, cfg, np.random.default_rng(1))]
        flat = np.concatenate(labelled)
        return int((flat == REC_ID).sum()), int((flat == SEARCH_ID).sum())

    joint = supervised_kinds(["rec", "search"])
    rec_before, search_before = kind_counts(joint, 0.0)
    rec_after, search_after = kind_counts(joint, 0.5)
    # each search written as a click moves one 4-token ID from the search task to the rec task
    assert rec_after > rec_before and rec_after - rec_before == search_before - search_after
    # a model that does not learn rec keeps its searches
    search_only = supervised_kinds(["search"])
    assert kind_counts(search_only, 0.5) == kind_counts(search_only, 0.0)


def test_item_tokens_follow_each_id_as_context_only():
    from gensar_core.model.timeline import item_token

    tok = build_tokenizer(["action crime"], TOKENS + sorted(item_token(i) for i in IDS.values()))
    c = TimelineCodec.of(tok, IDS)
    assert c.item_tokens and not codec()[1].item_tokens
    assert not TimelineCodec.of(build_tokenizer(["<item_x> crime"], TOKENS), IDS).item_tokens
    events = [{"behavior": "rec", "item_id": "i1", "query": None},
              {"behavior": "search", "item_id": "i2", "query": "action"}]
    ids, kinds, starts = c.timeline(events)
    words = tok.convert_ids_to_tokens(ids.tolist())
    assert words == [REC_ITEM, "<a_0>", "<b_1>", "<c_4>", "<d_5>", "<item_a0b1c4d5>",
                     SRC_QUERY, "action", SRC_ITEM, "<a_1>", "<b_0>", "<s_0>", "<t_0>", "<item_a1b0c0d0>"]
    assert kinds[5] == GIVEN and kinds[-1] == GIVEN and starts.tolist() == [0, 6]
    windows = training_windows([(ids, kinds, starts)], max_len=32, rng=np.random.default_rng(0))
    item_ids = {tok.convert_tokens_to_ids(t) for t in ("<item_a0b1c4d5>", "<item_a1b0c0d0>")}
    assert not item_ids & {int(t) for _, lab, _ in windows for t in lab[lab != IGNORE]}
    # a prompt keeps whole events, item tokens included; an item the vocabulary lacks reads <unk>
    text = c.prompt(events, "rec", None, max_len=32)
    assert tok.convert_ids_to_tokens(tok(text)["input_ids"]) == [BOS] + words
    newer = TimelineCodec(c.vocab, {**IDS, "i3": ItemIds("<a_2><b_2><s_2><t_2>", "<a_2><b_2><c_2><d_2>")}, True)
    assert newer.timeline([{"behavior": "rec", "item_id": "i3", "query": None}])[0][-1] == tok.unk_token_id


def test_history_ids_write_the_other_ids_own_codes_after_each_id():
    """With history_ids a click's collaborative ID is followed by its semantic suffix and a
    search's semantic ID by its collaborative suffix; those codes are labelled only when the
    align task is supervised, prompts carry them, and TIGER-style IDs (both the same) add none."""
    from gensar_core.model.timeline import ALIGN

    tok, plain = codec()
    c = TimelineCodec.of(tok, IDS, history_ids=True)
    events = [{"behavior": "rec", "item_id": "i1", "query": None},
              {"behavior": "search", "item_id": "i2", "query": "action"}]
    ids, kinds, starts = c.timeline(events)
    words = tok.convert_ids_to_tokens(ids.tolist())
    assert words == [REC_ITEM, "<a_0>", "<b_1>", "<c_4>", "<d_5>", "<s_2>", "<t_3>",
                     SRC_QUERY, "action", SRC_ITEM, "<a_1>", "<b_0>", "<s_0>", "<t_0>", "<c_0>", "<d_0>"]
    assert kinds.tolist() == [GIVEN] + [REC_ID] * 4 + [ALIGN] * 2 + [GIVEN, QUERY, QUERY] + [SEARCH_ID] * 4 + [ALIGN] * 2
    assert starts.tolist() == [0, 7] and len(plain.timeline(events)[0]) == len(ids) - 4
    for kinds_supervised, labelled in ((supervised_kinds(["rec", "search"]), 8),
                                       (supervised_kinds(["rec", "search", "align"]), 12)):
        (window, labels, _), = training_windows([(ids, kinds, starts)], 32, np.random.default_rng(0), kinds_supervised)
        assert int((labels != IGNORE).sum()) == labelled
    text = c.prompt(events, "rec", None, max_len=32)
    assert tok.convert_ids_to_tokens(tok(text)["input_ids"]) == [BOS] + words
    tiger = TimelineCodec.of(tok, {k: ItemIds(v.semantic_id, v.semantic_id) for k, v in IDS.items()}, history_ids=True)
    assert ALIGN not in tiger.timeline(events)[1].tolist()


def test_item_tokens_start_from_the_collaborative_vectors_with_distances_kept():
    import pandas as pd

    from gensar_core.model.timeline import item_token
    from gensar_core.model.timeline_train import init_item_embeddings

    items = {**IDS, "i3": ItemIds("<a_2><b_2><s_2><t_2>", "<a_2><b_2><c_2><d_2>"),
             "i4": ItemIds("<a_3><b_3><s_3><t_3>", "<a_3><b_3><c_3><d_3>")}
    tok = build_tokenizer([], TOKENS + sorted(item_token(items[i]) for i in ("i1", "i2", "i3")))
    model = mixed_windows_and_model(max_len=32)[2]
    model.resize_token_embeddings(len(tok))
    identifiers = pd.DataFrame({"item_idx": range(4), "item_id": list(items),
                                "semantic_id": [v.semantic_id for v in items.values()],
                                "collaborative_id": [v.collaborative_id for v in items.values()]})
    vectors = pd.DataFrame({"item_idx": [0, 1, 2, 3], "vector": [[3.0, 0.0, 4.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0],
                                                                 [1.0, 1.0, 1.0]]})
    assert init_item_embeddings(model, tok, identifiers, vectors, seed=0) == 3  # i4 has no token
    rows = model.get_input_embeddings().weight[tok.convert_tokens_to_ids([item_token(items[i]) for i in ("i1", "i2", "i3")])]
    # one scale for the whole table: distances keep their ratios (5 : 1 between these pairs)
    assert float((rows[0] - rows[1]).norm() / (rows[1] - rows[2]).norm()) == pytest.approx(5.0, rel=1e-4)
