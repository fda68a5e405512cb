"""A trained generative model ranks real cases through the evaluation protocols."""
from __future__ import annotations

import numpy as np
import pytest

from gensar_core.evaluate.context import EvalContext
from gensar_core.evaluate.protocols import evaluate_ranker
from gensar_core.pipeline import generative_rankers
from gensar_core.storage import Warehouse


@pytest.fixture(scope="module")
def trained(toy_model):
    return toy_model


def test_ranker_returns_valid_unseen_items(trained):
    ranker = generative_rankers(trained)["gensar"]
    ctx = EvalContext(trained)
    n_items = len(Warehouse(trained.warehouse).read("identifiers/items"))
    for task in ("rec", "search"):
        cases = ctx.cases("test", task)
        ranked = ranker.rank(cases, task, k=5)
        assert len(ranked) == len(cases)
        for items, ex in zip(ranked, cases["exclude"]):
            # history is banned inside the beam: a list is short only when fewer items are allowed
            assert len(items) == min(5, n_items - len(set(np.asarray(ex).tolist())))
            assert len(set(items.tolist())) == len(items)
            assert ((items >= 0) & (items < n_items)).all()
            assert not set(items.tolist()) & set(np.asarray(ex).tolist())


def teacher_forced_scores(ranker, prompts: list[str], task: str) -> np.ndarray:
    """[B, N] log-probability of every item's full ID given each prompt (full-vocabulary softmax),
    computed by scoring each ID token by token: the exact ranking an exhaustive search must give."""
    import torch

    model, sequences = ranker.model, ranker.sequences[task]
    input_ids, mask = ranker.encode(prompts)
    start = model.config.decoder_start_token_id
    n_items, levels = sequences.shape
    out = np.zeros((len(prompts), n_items))
    with torch.inference_mode():
        for row in range(len(prompts)):
            decoder = torch.cat([torch.full((n_items, 1), start), ranker.prefix[task].expand(n_items, 1),
                                 sequences[:, :-1]], dim=1)
            logits = model(input_ids=input_ids[row:row + 1].expand(n_items, -1),
                           attention_mask=mask[row:row + 1].expand(n_items, -1), decoder_input_ids=decoder).logits
            logp = logits[:, 1:].float().log_softmax(-1).gather(2, sequences[:, :, None]).squeeze(2)
            out[row, ranker.item_idx] = logp.sum(1).numpy()
    return out


def test_ranker_gives_the_exact_ranking_and_its_metrics(trained):
    """With a beam as wide as the catalogue the search is exhaustive: its lists are the items
    sorted by their teacher-forced log-probabilities, history excluded, and the protocol's
    NDCG@10 / HR@10 are those of that known ranking."""
    from gensar_core.config import with_overrides
    from gensar_core.evaluate.metrics import hit_rate_at_k, ndcg_at_k

    n_items = len(Warehouse(trained.warehouse).read("identifiers/items"))
    cfg = with_overrides(trained, [f"evaluate.beam_size={n_items}", "evaluate.normalize=vocab",
                                   "evaluate.protocols=[full]", "evaluate.max_cases=12"])
    ranker = generative_rankers(cfg)["gensar"]
    ctx = EvalContext(cfg)
    result = evaluate_ranker(ranker, cfg, "test", ctx=ctx, tasks=("rec",))["full"]["rec"]
    cases = ctx.cases("test", "rec")
    scores = teacher_forced_scores(ranker, ranker.prompts(cases, "rec"), "rec")
    known = []
    for row, exclude in enumerate(cases["exclude"]):
        s = scores[row].copy()
        s[np.asarray(exclude, dtype=np.int64)] = -np.inf
        known.append(np.argsort(-s, kind="stable")[:10])
    ranked = ranker.rank(cases, "rec", 10)
    for ours, ref, row in zip(ranked, known, scores):
        assert len(ours) == 10
        # the same list, up to ties in the teacher-forced scores
        np.testing.assert_allclose(row[ours], row[ref], atol=1e-4)
    targets = cases["target"].to_numpy()
    assert result["n"] == len(cases) == 12
    assert result["NDCG@10"] == pytest.approx(ndcg_at_k(known, targets, 10), abs=1e-9)
    assert result["HR@10"] == pytest.approx(hit_rate_at_k(known, targets, 10), abs=1e-9)


def test_search_with_the_rec_prior_ranks_by_both_log_probs(trained):
    """`evaluate.search_rec_weight` w: with a beam as wide as the catalogue, search lists are the
    items sorted by log p(semantic ID | search prompt) + w * log p(collaborative ID | rec prompt),
    history excluded, each teacher-forced; the scores batch scoring writes are those sums."""
    from gensar_core.config import with_overrides

    n_items = len(Warehouse(trained.warehouse).read("identifiers/items"))
    cfg = with_overrides(trained, [f"evaluate.beam_size={n_items}", "evaluate.normalize=vocab",
                                   "evaluate.search_rec_weight=0.5"])
    ranker = generative_rankers(cfg)["gensar"]
    assert ranker.search_rec_weight == 0.5 and "search + 0.5 x rec" in ranker.description
    cases = EvalContext(cfg).cases("test", "search").head(6).reset_index(drop=True)
    total = (teacher_forced_scores(ranker, ranker.prompts(cases, "search"), "search")
             + 0.5 * teacher_forced_scores(ranker, ranker.prompts(cases, "rec"), "rec"))
    for row, exclude in enumerate(cases["exclude"]):
        total[row, np.asarray(exclude, dtype=np.int64)] = -np.inf
    ranked = ranker.top_k_unseen(cases, "search", 10)
    for (items, scores), row in zip(ranked, total):
        assert len(items) == 10
        np.testing.assert_allclose(row[items], np.sort(row)[::-1][:10], atol=1e-3)  # the same list, up to ties
        np.testing.assert_allclose(scores, row[items], atol=1e-3)
    # a search-only model has no rec head to ask
    assert generative_rankers(with_overrides(cfg, ["evaluate.search_rec_weight=0"]))["gensar"].search_rec_weight == 0


@pytest.mark.parametrize("scoring", ["level", "vocab"])
def test_candidates_in_batches_rank_as_a_trie_of_each_cases_candidates(trained, scoring):
    """With `level` or `vocab` scoring the 100-candidate protocol bans every other item of the full
    trie and decodes the cases in batches: with `vocab` the same lists as a trie of each case's
    candidates; `level` normalises over the catalogue's codebook there, as in full ranking (a trie
    of the candidates alone would normalise over their codes only)."""
    from gensar_core.config import with_overrides

    ranker = generative_rankers(with_overrides(trained, [f"evaluate.normalize={scoring}"]))["gensar"]
    rng = np.random.default_rng(0)
    for task in ("rec", "search"):
        cases = EvalContext(trained).cases("test", task).head(8).reset_index(drop=True)
        candidates = [np.sort(rng.choice(ranker.item_idx, 12, replace=False)) for _ in range(len(cases))]
        batched = ranker.rank(cases, task, 5, candidates)
        for ours, alone, cand in zip(batched, ranker.rank_each_among(cases, task, 5, candidates), candidates):
            assert len(ours) == 5 and set(ours.tolist()) <= set(cand.tolist())
            if scoring == "vocab":
                assert ours.tolist() == alone.tolist()


def test_an_untrained_variant_fails_the_evaluation(trained):
    from gensar_core.config import with_overrides

    cfg = with_overrides(trained, ['evaluate.variants={"never-trained": ["train.run_name=never-trained-run"]}'])
    with pytest.raises(FileNotFoundError, match="never-trained: no trained model.*--variant never-trained"):
        generative_rankers(cfg)


def test_each_train_seed_is_its_own_model(trained):
    """`evaluate.seeds`: a replica at another train seed has its own folder (the config's own
    seed keeps the plain one) and its own row; an untrained one says how to train it."""
    from gensar_core.config import with_overrides
    from gensar_core.model.runs import trained_model_dir

    own = trained_model_dir(trained)
    assert trained_model_dir(with_overrides(trained, [f"train.seed={trained.seed}"])) == own
    assert trained_model_dir(with_overrides(trained, ["train.seed=7"])).name == own.name + "__seed7"
    # a variant told apart only by settings the name does not show gets its tag, seeds apart too
    tagged = with_overrides(trained, ["train.run_tag=sw1", "train.seed=7"])
    assert trained_model_dir(tagged).name == own.name + "__sw1__seed7"
    cfg = with_overrides(trained, ['evaluate.seeds={"gensar": [7]}'])
    with pytest.raises(FileNotFoundError, match=r"gensar@seed7: no trained model.*__seed7.*--set train\.seed=7"):
        generative_rankers(cfg)
    # the config's own seed is not a replica
    assert set(generative_rankers(with_overrides(trained, [f'evaluate.seeds={{"gensar": [{trained.seed}]}}']))) == {"gensar"}


def test_tiger_style_variant_in_the_same_report(toy_model, tmp_path):
    """A single-ID (semantic IDs everywhere) model trained beside GenSAR is evaluated as a variant."""
    import shutil

    from gensar_core.config import with_overrides
    from gensar_core.evaluate.run import run_evaluate
    from gensar_core.pipeline import step_build_corpus, step_train

    shutil.copytree(toy_model.warehouse, tmp_path / "wh")
    cfg = with_overrides(toy_model, [f"warehouse={tmp_path / 'wh'}", "tracking.enabled=false",
                                     'evaluate.variants={"tiger-style": ["corpus.id_scheme=semantic"]}',
                                     "evaluate.protocols=[full]"])
    tiger = with_overrides(cfg, ["corpus.id_scheme=semantic"])
    step_build_corpus(tiger)
    rec = Warehouse(tiger.warehouse).read("corpus/rec")
    assert rec["target_text"].str.contains(r"<rec_item><a_\d+><b_\d+><s_\d+><t_\d+>", regex=True).all()
    step_train(tiger)
    rankers = generative_rankers(cfg)
    assert set(rankers) == {"gensar", "tiger-style"}
    # the single-ID model decodes semantic IDs for recommendation too; GenSAR collaborative ones
    tiger, gensar = rankers["tiger-style"].sequences, rankers["gensar"].sequences
    assert (tiger["rec"] == tiger["search"]).all() and not (gensar["rec"] == gensar["search"]).all()
    result = run_evaluate(cfg, extra_rankers=rankers)
    assert {"gensar", "tiger-style"} <= set(result["methods"])


def test_normalize_setting_reaches_the_decoder(trained):
    """`evaluate.normalize` picks the decoder's softmax: the prefix-renormalised log-probs are never
    below the full-vocabulary ones of the same items (they divide by less mass)."""
    from gensar_core.config import with_overrides

    ctx = EvalContext(trained)
    cases = ctx.cases("test", "rec").head(4)
    scores = {}
    for scoring in ("prefix", "vocab"):
        ranker = generative_rankers(with_overrides(trained, [f"evaluate.normalize={scoring}"]))["gensar"]
        assert ranker.normalize == scoring
        items, sc = ranker.decode(ranker.view_prompts(cases, "rec"), "rec", beam=5, top_k=5)
        scores[scoring] = {(row, item): score for row in range(len(items))
                           for item, score in zip(items[row].tolist(), sc[row].tolist())}
        assert (sc <= 1e-6).all()
    common = set(scores["prefix"]) & set(scores["vocab"])
    assert common and all(scores["prefix"][i] >= scores["vocab"][i] - 1e-5 for i in common)


def test_decode_settings_round_trip_as_json_and_read_what_older_models_saved():
    import json

    from gensar_core.model.generative_ranker import DecodeSettings

    settings = DecodeSettings(beam_size=40, normalize="level", search_rec_weight=0.5, extra_prompt_tokens=(128, 512))
    assert DecodeSettings.from_json(json.loads(json.dumps(settings.to_json()))) == settings
    older = {k: v for k, v in settings.to_json().items() if k != "normalize"} | {"scoring": "prefix"}
    assert DecodeSettings.from_json(older) == DecodeSettings(**{**settings.__dict__, "normalize": "prefix"})
