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
    assert kind_weights(search=2.0, kinds=(REC_ID, SEARCH_ID)).tolist() == [0, 1, 1, 2]
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
def test_loss_weights_cover_the_supervised_kinds_and_vanish_when_equal():
    """The configured weights by kind, ad-hoc windows counting as search IDs; a single-task model
    has no other kind to weigh against, so its loss stays the plain mean."""
    from types import SimpleNamespace

    from gensar_core.config import TimelineModelConfig
    from gensar_core.model.timeline_train import kind_loss_weights

    timeline_cfg = TimelineModelConfig()
    joint = SimpleNamespace(kinds=(REC_ID, QUERY, SEARCH_ID), adhoc=[])
    assert kind_loss_weights(joint, timeline_cfg).tolist() == [0.0, 1.0, 0.5, 2.0]  # GIVEN, rec, query, search
    assert kind_loss_weights(SimpleNamespace(kinds=(REC_ID,), adhoc=[]), timeline_cfg) is None
    rec_and_adhoc = SimpleNamespace(kinds=(REC_ID,), adhoc=[("i1", "drama")])
    assert kind_loss_weights(rec_and_adhoc, timeline_cfg).tolist() == [0.0, 1.0, 0.5, 2.0]


@pytest.mark.parametrize("ema,history_ids", [(0.99, True), (None, False)])
def test_training_keeps_the_best_validation_checkpoint_and_the_ranker_reads_whole_histories(tmp_path, monkeypatch,
                                                                                          ema, history_ids):
    """The kept checkpoint is the best by the mean valid NDCG@10 of the tasks; with a weight
    average (the default, 0.99) it is the average that is validated and saved; a model trained
    with both IDs in its history (the default) ranks with them (its saved folder says so)."""
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
    cfg = PipelineConfig.model_validate({
        "warehouse": str(root), "identifiers": {"codebook_size": 8}, "tracking": {"enabled": False},
        "model": {"formulation": "timeline", "timeline": {"init_ids_from_codes": False, "max_len": 64, "d_model": 32, "d_ff": 64, "num_heads": 2,
                                                          "num_layers": 1, "tokens_per_batch": 512,
                                                          "ema_decay": ema, "history_ids": history_ids}},
        "train": {"epochs": 4, "lr": 3e-3, "warmup_steps": 2, "eval_every": 3, "patience": 0, "progress": False},
        "evaluate": {"beam_size": 8}})
    result = run_train_timeline(cfg)
    folder = Path(result["model_dir"])
    history = json.loads((folder / "train_history.json").read_text())["evals"]
    key = "valid/ndcg@10"
    best = max(history, key=lambda e: e[key])
    assert result["metric"] == key and result["best_step"] == best["step"] and result["best_metric"] == best[key]
    assert result["steps"] == result["total_steps"] and result["train/supervised_tokens_per_s"] > 0
    assert {"valid/rec_ndcg@10", "valid/search_ndcg@10"} <= set(best)
    ids = Warehouse(root).read("identifiers/items")
    ranker = GenerativeRanker(folder, ids, ranker_settings(cfg))
    assert ranker.timeline is not None and ranker.max_input == 64
    assert ranker.timeline.history_ids == history_ids
    # model.timeline.prompt_tokens: prompts keep the last events that fit in fewer tokens
    short = GenerativeRanker(folder, ids, ranker_settings(with_overrides(cfg, ["model.timeline.prompt_tokens=24"])))
    ctx = EvalContext(cfg)
    rec_cases = ctx.cases("test", "rec")
    widths = [short.encode(short.prompts(rec_cases, "rec"))[0].shape[1], ranker.encode(ranker.prompts(rec_cases, "rec"))[0].shape[1]]
    assert short.max_input == 24 and widths[0] <= 24 < widths[1] <= 64
    # model.timeline.extra_prompt_tokens: each model also reads the prompts cut to other lengths
    viewed = GenerativeRanker(folder, ids, ranker_settings(with_overrides(
        cfg, ["model.timeline.extra_prompt_tokens=[24, 64, 100]"])))
    assert viewed.views == (64, 24) and "2 prompt lengths" in viewed.description
    assert ranker_settings(cfg, validation=True).extra_prompt_tokens == ()
    for task in ("rec", "search"):
        cases = ctx.cases("test", task)
        for model in (ranker, viewed):  # search with the rec prior (the default) too
            lists = model.rank(cases, task, 5)
            for items, banned in zip(lists, cases["exclude"]):
                assert len(items) == min(5, 30 - len(set(banned)))
                assert not set(items.tolist()) & set(banned.tolist())
    # the best weights are the ones saved: validating the saved model again gives its number
    from gensar_core.model.timeline_train import valid_cases, validate

    again = validate(GenerativeRanker(folder, ids, ranker_settings(cfg, validation=True)), valid_cases(cfg, None))
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


def test_auto_precision_is_bf16_only_on_a_cpu_with_native_bf16(monkeypatch):
    """Emulated bf16 is slower than float32: `auto` autocasts only where the CPU computes bf16."""
    import torch
    import torch.cpu

    from gensar_core.model.training import amp_dtype, autocast

    cpu = torch.device("cpu")
    for native in (False, True):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        with autocast(cpu, amp_dtype(cpu, "auto")):
            assert torch.is_autocast_enabled("cpu") == (native and torch.backends.mkldnn.is_available())
    with autocast(cpu, amp_dtype(cpu, "bf16")):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
    for off in ("no", "fp16"):  # fp16 is for GPUs
        assert amp_dtype(cpu, off) is None
        with autocast(cpu, amp_dtype(cpu, off)):
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


def test_history_ids_write_the_other_ids_own_codes_after_each_id():
    """With history_ids a click's collaborative ID is followed by its semantic suffix and a
    search's semantic ID by its collaborative suffix; those codes are context, never labelled,
    prompts carry them, and TIGER-style IDs (both the same) add none."""
    tok, plain = codec()
    c = TimelineCodec.of(tok, IDS, history_ids=True)
    events = [{"behavior": "rec", "item_id": "i1", "query": None},
              {"behavior": "search", "item_id": "i2", "query": "action"}]
    ids, kinds, starts = c.timeline(events)
    words = tok.convert_ids_to_tokens(ids.tolist())
    assert words == [REC_ITEM, "<a_0>", "<b_1>", "<c_4>", "<d_5>", "<s_2>", "<t_3>",
                     SRC_QUERY, "action", SRC_ITEM, "<a_1>", "<b_0>", "<s_0>", "<t_0>", "<c_0>", "<d_0>"]
    assert kinds.tolist() == [GIVEN] + [REC_ID] * 4 + [GIVEN] * 2 + [GIVEN, QUERY, QUERY] + [SEARCH_ID] * 4 + [GIVEN] * 2
    assert starts.tolist() == [0, 7] and len(plain.timeline(events)[0]) == len(ids) - 4
    (window, labels, _), = training_windows([(ids, kinds, starts)], 32, np.random.default_rng(0),
                                            supervised_kinds(["rec", "search", "query"]))
    labelled = {int(i) for i in np.flatnonzero(labels != IGNORE)}
    assert labelled == {2, 3, 4, 5, 9, 10, 11, 12, 13, 14}  # window = BOS + ids: the IDs, the query word, <src_item>
    text = c.prompt(events, "rec", None, max_len=32)
    assert tok.convert_ids_to_tokens(tok(text)["input_ids"]) == [BOS] + words
    tiger = TimelineCodec.of(tok, {k: ItemIds(v.semantic_id, v.semantic_id) for k, v in IDS.items()}, history_ids=True)
    assert len(tiger.timeline(events)[0]) == len(plain.timeline(events)[0])
