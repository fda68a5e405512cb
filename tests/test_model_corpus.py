"""Vocabulary, behaviour-aware history rendering, prompt templates and the build_corpus step."""
from __future__ import annotations

import re

import pandas as pd
import pytest

from gensar_core.config import PipelineConfig
from gensar_core.identifiers.naming import vocabulary
from gensar_core.model import corpus as corpus_mod
from gensar_core.model.backbone import build_scratch_tokenizer
from gensar_core.model.corpus import TASKS, derived_query, run_build_corpus
from gensar_core.model.prompts import TEMPLATES, ItemIds, render_history, select_history, templates
from toy_warehouse import write_toy_warehouse
from gensar_core.model.vocab import BEHAVIOUR_TOKENS, add_vocabulary, added_tokens, check_single_tokens
from gensar_core.storage import Warehouse

SEM = re.compile(r"^<src_item><a_\d+><b_\d+><s_\d+><t_\d+>$")
COL = re.compile(r"^<rec_item><a_\d+><b_\d+><c_\d+><d_\d+>$")


def make_cfg(wh, **sections) -> PipelineConfig:
    """A config of the prompted recipe, the formulation that reads the corpus."""
    tree = {"warehouse": str(wh), "identifiers": {"codebook_size": 8}, "model": {"formulation": "prompted"}}
    tree.update(sections)
    return PipelineConfig.model_validate(tree)


@pytest.fixture
def toy(tmp_path):
    wh = tmp_path / "warehouse"
    write_toy_warehouse(wh, n_users=20, n_items=24, events_per_user=10, seed=3)
    return wh


# ---------------------------------------------------------------- vocabulary
def test_every_identifier_and_behaviour_token_is_one_token():
    cfg = PipelineConfig(identifiers={"codebook_size": 16})
    tokens = added_tokens(cfg)
    assert tokens[:3] == list(BEHAVIOUR_TOKENS)
    assert tokens[3:] == vocabulary(2, 2, 16) and len(tokens) == 3 + 6 * 16
    tok = build_scratch_tokenizer(["some words for a tiny tokenizer <a_1>", "more words"], 300, tokens)
    check_single_tokens(tok, tokens)
    ids = tok("<rec_item><a_3><b_7><c_5><d_2>", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["<rec_item>", "<a_3>", "<b_7>", "<c_5>", "<d_2>"]
    # spaces before an added token are absorbed; decoding keeps the tokens
    ids = tok("<src_query> drama night <src_item><a_1><b_2><s_3><t_4>", add_special_tokens=False)["input_ids"]
    toks = tok.convert_ids_to_tokens(ids)
    assert toks[0] == "<src_query>" and toks[-5:] == ["<src_item>", "<a_1>", "<b_2>", "<s_3>", "<t_4>"]
    assert "<src_item><a_1><b_2><s_3><t_4>" in tok.decode(ids, skip_special_tokens=True)
    # adding again changes nothing
    n = len(tok)
    assert add_vocabulary(tok, tokens) == tok.convert_tokens_to_ids(tokens) and len(tok) == n


# ---------------------------------------------------------------- history
IDS = {"r1": ItemIds("<a_1><b_1><s_1><t_1>", "<a_1><b_1><c_1><d_1>"),
       "r2": ItemIds("<a_2><b_2><s_2><t_2>", "<a_2><b_2><c_2><d_2>"),
       "s1": ItemIds("<a_3><b_3><s_3><t_3>", "<a_3><b_3><c_3><d_3>")}


def ev(behavior, item, ts, query=None):
    return {"behavior": behavior, "item_id": item, "query": query, "ts": ts}


def test_history_interleaves_behaviours_in_time_order():
    hist = [ev("rec", "r1", 1), ev("search", "s1", 2, "funny robots"), ev("rec", "r2", 3)]
    assert render_history(hist, IDS) == (
        "<rec_item><a_1><b_1><c_1><d_1> "
        "<src_query> funny robots <src_item><a_3><b_3><s_3><t_3> "
        "<rec_item><a_2><b_2><c_2><d_2>")
    assert render_history([], IDS) == "(none)"


def test_history_limits_keep_the_most_recent_of_each_behaviour():
    hist = [ev("rec", f"r{1 + i % 2}", i) for i in range(8)] + [ev("search", "s1", 10 + i, f"q{i}") for i in range(7)]
    hist.sort(key=lambda e: e["ts"])
    kept = select_history(hist, max_rec=2, max_search=3)
    assert [e["ts"] for e in kept] == [6, 7, 14, 15, 16]
    assert len(select_history(hist)) == 10  # default 5 + 5
    assert select_history(hist, 0, 0) == []
    text = render_history(hist, IDS, max_rec=1, max_search=1)
    assert text.count("<rec_item>") == 1 and text.count("<src_query>") == 1 and "q6" in text


def test_unknown_history_item_is_an_error():
    with pytest.raises(KeyError, match="nope"):
        render_history([ev("rec", "nope", 1)], IDS)


def test_templates_per_task():
    for task in ("rec", "search", "query", "adhoc"):
        tpl = templates(task)
        assert len(tpl) == 10 and len(set(tpl)) == 10
    assert all(len(v) >= 5 for v in TEMPLATES["align"].values())
    for t in templates("search"):
        assert "{history}" in t and "{query}" in t
    for t in templates("rec") + templates("query"):
        assert "{history}" in t and "{query}" not in t


def test_derived_query():
    assert derived_query("Toy Story", ["Animation", "Children's", "Comedy"]) == "animation children's comedy toy story"
    assert derived_query("Heat", None) == "heat"


# ---------------------------------------------------------------- build_corpus
def read_all(wh) -> dict[str, pd.DataFrame]:
    w = Warehouse(wh)
    return {t: w.read(f"corpus/{t}") for t in TASKS if w.path("corpus", t).exists()}


def test_build_corpus_tables(toy):
    cfg = make_cfg(toy)
    result = run_build_corpus(cfg)
    assert result["tasks"] == list(TASKS)
    tables = read_all(toy)
    w = Warehouse(toy)
    train, valid = w.read("splits/train"), w.read("splits/valid")
    ident = w.read("identifiers/items").set_index("item_id")
    for task, df in tables.items():
        assert list(df.columns[:5]) == ["input_text", "target_text", "task", "template_id", "split"]
        assert (df["task"] == task).all() and df["input_text"].str.len().gt(0).all()
    rec, search, query = tables["rec"], tables["search"], tables["query"]
    n_rec = int((train["behavior"] == "rec").sum())
    n_src = int((train["behavior"] == "search").sum())
    assert (rec["split"] == "train").sum() == n_rec and (search["split"] == "train").sum() == n_src
    assert (query["split"] == "train").sum() == n_src
    assert rec["target_text"].str.match(COL).all() and search["target_text"].str.match(SEM).all()
    assert query["target_text"].str.startswith("<src_query> ").all()
    assert tables["adhoc"]["target_text"].str.match(SEM).all()
    # targets are the clicked item's IDs
    row = rec.iloc[0]
    assert row["target_text"] == "<rec_item>" + ident.loc[row["item_id"], "collaborative_id"]
    row = search.iloc[0]
    assert row["target_text"] == "<src_item>" + ident.loc[row["item_id"], "semantic_id"]
    # validation rows: from splits/valid, template 0, rec + search + query only
    for task, behaviour in (("rec", "rec"), ("search", "search"), ("query", "search")):
        v = tables[task][tables[task]["split"] == "valid"]
        assert len(v) == int((valid["behavior"] == behaviour).sum()) and (v["template_id"] == 0).all()
        assert set(v["user_id"]) <= set(valid["user_id"])
    assert (tables["adhoc"]["split"] == "train").all() and (tables["align"]["split"] == "train").all()
    # several templates are actually used
    assert rec.loc[rec["split"] == "train", "template_id"].nunique() >= 5
    # alignment both ways, for every item
    align = tables["align"]
    assert set(align["variant"]) == {"text2sem", "text2col", "sem2title", "col2title"}
    assert (align.groupby("variant")["item_id"].nunique() == len(ident)).all()
    t2s = align[align["variant"] == "text2sem"].iloc[0]
    assert t2s["target_text"] == ident.loc[t2s["item_id"], "semantic_id"]
    s2t = align[align["variant"] == "sem2title"].iloc[0]
    assert ident.loc[s2t["item_id"], "semantic_id"] in s2t["input_text"]
    manifest = (toy / "corpus" / "_manifest.json").read_text()
    assert '"content_hash"' in manifest


def test_adhoc_pseudo_queries_come_from_train_and_catalogue(toy):
    cfg = make_cfg(toy, corpus={"max_pseudo_queries": 2, "tasks": {"adhoc": {"templates_per_example": 1}}})
    run_build_corpus(cfg)
    w = Warehouse(toy)
    adhoc = w.read("corpus/adhoc")
    train = w.read("splits/train")
    items = w.read("curated/items").set_index("item_id")
    ident = w.read("identifiers/items").set_index("item_id")
    train_q = train[train["behavior"] == "search"].groupby("item_id")["query"].agg(set)
    assert set(adhoc["item_id"]) == set(items.index)  # every item, searched or not
    for item, group in adhoc.groupby("item_id"):
        derived = derived_query(items.loc[item, "title"], items.loc[item, "categories"])
        allowed = train_q.get(item, set()) | {derived}
        assert any(derived in t for t in group["input_text"])
        assert 1 <= len(group) <= 3  # at most 2 observed + 1 derived, one template each
        for text in group["input_text"]:
            assert any(q in text for q in allowed), text
        assert (group["target_text"] == "<src_item>" + ident.loc[item, "semantic_id"]).all()


def test_corpus_is_deterministic_and_tasks_switch_off(toy, tmp_path):
    cfg = make_cfg(toy)
    run_build_corpus(cfg)
    first = read_all(toy)
    run_build_corpus(cfg)
    again = read_all(toy)
    for t in TASKS:
        pd.testing.assert_frame_equal(first[t], again[t])

    off = make_cfg(toy, corpus={"tasks": {"query": {"enabled": False}, "align": {"enabled": False}}})
    result = run_build_corpus(off)
    assert result["tasks"] == ["rec", "search", "adhoc"]
    fewer = read_all(toy)
    assert set(fewer) == {"rec", "search", "adhoc"}  # the old tables went with the swap
    for t in fewer:  # the other tasks are unchanged, row for row
        pd.testing.assert_frame_equal(first[t], fewer[t])

    more = make_cfg(toy, corpus={"tasks": {"rec": {"templates_per_example": 3}}})
    run_build_corpus(more)
    rec3 = Warehouse(toy).read("corpus/rec")
    n_train = int((first["rec"]["split"] == "train").sum())
    assert (rec3["split"] == "train").sum() == 3 * n_train
    per_row = rec3[rec3["split"] == "train"].groupby(["user_id", "item_id", "target_text"])["template_id"]
    assert (per_row.nunique() >= 3).all()  # distinct templates per source row

    with pytest.raises(ValueError, match="switched off"):
        run_build_corpus(make_cfg(toy, corpus={"tasks": {t: {"enabled": False} for t in TASKS}}))
    # a different seed gives other template picks, same rows
    other = make_cfg(toy, seed=7)
    run_build_corpus(other)
    rec7 = Warehouse(toy).read("corpus/rec")
    assert len(rec7) == len(first["rec"]) and (rec7["target_text"] == first["rec"]["target_text"]).all()
    assert not (rec7["template_id"] == first["rec"]["template_id"]).all()


def test_failed_build_keeps_the_previous_corpus(toy, monkeypatch):
    cfg = make_cfg(toy)
    run_build_corpus(cfg)
    before = read_all(toy)

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(corpus_mod, "write_table", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        run_build_corpus(make_cfg(toy, corpus={"tasks": {"rec": {"enabled": False}}}))
    after = read_all(toy)
    assert set(after) == set(before)
    pd.testing.assert_frame_equal(after["rec"], before["rec"])
    assert not [p for p in toy.iterdir() if ".tmp-" in p.name]


def test_items_without_identifiers_are_refused(toy):
    w = Warehouse(toy)
    ident = w.read("identifiers/items")
    from gensar_core.storage import atomic_dir, write_table

    with atomic_dir(w.path("identifiers")) as stage:
        write_table(ident.iloc[1:], stage / "items")
    with pytest.raises(ValueError, match="without an identifier"):
        run_build_corpus(make_cfg(toy))


def test_a_missing_valid_split_is_an_error_not_silence(toy):
    """Without splits/valid training would run with no validation and no checkpoint selection."""
    import shutil

    shutil.rmtree(Warehouse(toy).path("splits", "valid"))
    with pytest.raises(FileNotFoundError, match="splits/valid"):
        run_build_corpus(make_cfg(toy))
