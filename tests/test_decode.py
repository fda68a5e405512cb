"""Constrained beam search: the prefix index, the output layer, and equality with HF `generate`.

Models are tiny and random (built from configs, nothing downloaded). Their weights are drawn
wider than the defaults so next-token distributions are peaked, which keeps near-ties (where
beam search may legitimately differ in float rounding) rare; comparisons still allow ties.
"""
from __future__ import annotations

import pytest
import torch

from gensar_core.model import decoder_states, onednn, t5_tree
from gensar_core.model.decode import constrained_beam_search
from gensar_core.model.decode_reference import hf_beam_search, topk_agreement
from gensar_core.model.output_head import OutputHead
from gensar_core.model.prefix_index import PrefixIndex

WORDS, LEVELS, CODEBOOK, ITEMS = 40, 4, 16, 200
REC, SRC = WORDS, WORDS + 1  # behaviour tokens
ID_BASE = WORDS + 3
VOCAB = ID_BASE + LEVELS * CODEBOOK
BEAM, TOP_K = 8, 5


def id_tokens(codes: torch.Tensor) -> torch.Tensor:
    return ID_BASE + torch.arange(codes.shape[1]) * CODEBOOK + codes


@pytest.fixture(scope="module")
def catalogue():
    g = torch.Generator().manual_seed(7)
    codes = torch.unique(torch.randint(0, CODEBOOK, (3 * ITEMS, LEVELS), generator=g), dim=0)
    codes = codes[torch.randperm(len(codes), generator=g)[:ITEMS]]
    seqs = id_tokens(codes)
    items = torch.randperm(10_000, generator=g)[:ITEMS]  # item ids need not be 0..N-1
    return seqs, items, PrefixIndex.from_sequences(seqs, items)


def t5(**overrides):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                  decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, initializer_factor=3.0)
    return T5ForConditionalGeneration(T5Config(**{**config, **overrides})).eval()


def mt5(**overrides):
    """mT5: gated-GELU feed-forward, and in transformers 5 no output scaling despite tied weights."""
    from transformers import MT5Config, MT5ForConditionalGeneration

    torch.manual_seed(0)
    config = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                  decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, initializer_factor=3.0)
    return MT5ForConditionalGeneration(MT5Config(**{**config, **overrides})).eval()


def llama(**overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=2, eos_token_id=1,
                  tie_word_embeddings=False, initializer_range=0.2)
    return LlamaForCausalLM(LlamaConfig(**{**config, **overrides})).eval()


@pytest.fixture(scope="module")
def models():
    return {"t5": t5(), "mt5": mt5(), "llama": llama()}


def prompts(users: int = 4, length: int = 12, seed: int = 3):
    """Random word prompts, some shorter ones left-padded (valid for both model kinds)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, WORDS, (users, length), generator=g)
    mask = torch.ones_like(ids)
    for row in range(1, users, 2):
        mask[row, : 2 + row] = 0
        ids[row, : 2 + row] = 0
    return ids, mask


def assert_same(ours, ref, exact_scores: bool = True):
    items, scores = ours
    ref_items, ref_scores = ref
    assert items.shape == ref_items.shape == (ref_items.shape[0], TOP_K)
    if exact_scores:  # scores reach -70 here: float32 rounding differs by a few 1e-4 between kernels
        torch.testing.assert_close(scores, ref_scores, atol=1e-3, rtol=1e-4)
    agree = topk_agreement(items, ref_items, ref_scores, tol=1e-2)
    assert bool(agree.all()), (items, ref_items, scores, ref_scores)


def assert_valid(items, scores, catalogue_items):
    valid = set(catalogue_items.tolist())
    for row, row_scores in zip(items.tolist(), scores):
        assert set(row) <= valid
        assert len(set(row)) == len(row)  # no item twice
        assert bool((row_scores[:-1] >= row_scores[1:]).all())  # best first


# ---------------------------------------------------------------- prefix index
def test_index_layout_on_a_small_trie():
    seqs = torch.tensor([[5, 7, 1], [5, 7, 2], [5, 8, 1], [6, 7, 1]])
    index = PrefixIndex.from_sequences(seqs[[3, 0, 2, 1]], item_ids=torch.tensor([13, 10, 12, 11]))
    assert index.levels == 3 and [index.nodes(t) for t in range(4)] == [1, 2, 3, 4]
    assert index.width == (2, 2, 2)
    assert index.token[0].tolist() == [5, 6] and index.ptr[0].tolist() == [0, 2]
    assert index.token[1].tolist() == [7, 8, 7] and index.ptr[1].tolist() == [0, 2, 3]
    assert index.token[2].tolist() == [1, 2, 1, 1] and index.ptr[2].tolist() == [0, 2, 3, 4]
    assert index.leaf_item.tolist() == [10, 11, 12, 13]
    assert [t.tolist() for t in index.level_tokens] == [[5, 6], [7, 8], [1, 2]]
    assert index.column[1].tolist() == [0, 1, 0]
    child, valid = index.children(1, torch.tensor([0, 1]))
    assert child[valid].tolist() == [0, 1, 2] and valid.tolist() == [[True, True], [True, False]]
    assert index.trie() == {5: {7: {1: 10, 2: 11}, 8: {1: 12}}, 6: {7: {1: 13}}}


def test_index_children_match_the_python_trie(catalogue):
    seqs, items, index = catalogue
    trie = index.trie()
    frontier = [((), trie)]  # walk every level: vectorised children == dict keys
    node_of = {(): 0}
    for level in range(LEVELS):
        nodes = torch.tensor([node_of[p] for p, _ in frontier])
        child, valid = index.children(level, nodes)
        nxt = []
        for row, (prefix, sub) in enumerate(frontier):
            toks = index.token[level][child[row][valid[row]]].tolist()
            assert toks == sorted(sub.keys())
            for tok, c in zip(toks, child[row][valid[row]].tolist()):
                node_of[prefix + (tok,)] = c
                nxt.append((prefix + (tok,), sub[tok]))
        frontier = nxt
    leaves = torch.tensor([node_of[tuple(s)] for s in seqs.tolist()])
    assert index.items_of(leaves).tolist() == items.tolist()


def test_index_rejects_duplicates_and_empty_sets():
    with pytest.raises(ValueError, match="duplicate"):
        PrefixIndex.from_sequences(torch.tensor([[1, 2], [3, 4], [1, 2]]))
    with pytest.raises(ValueError):
        PrefixIndex.from_sequences(torch.zeros(0, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="item ids"):
        PrefixIndex.from_sequences(torch.tensor([[1, 2]]), item_ids=[1, 2])


def test_index_from_identifier_strings_with_a_behaviour_token():
    vocab = {"<rec_item>": 3, "<a_0>": 10, "<a_1>": 11, "<b_0>": 20, "<b_5>": 25, "<c_2>": 32}
    index = PrefixIndex.from_identifiers(["<a_0><b_5><c_2>", "<a_1><b_0><c_2>"], vocab, item_ids=[4, 9],
                                         prefix=["<rec_item>"])
    assert index.sequences.tolist() == [[3, 10, 25, 32], [3, 11, 20, 32]]
    assert index.leaf_item.tolist() == [4, 9] and index.width[0] == 1
    with pytest.raises(ValueError):
        PrefixIndex.from_identifiers(["<a_0>junk"], vocab)


# ---------------------------------------------------------------- output layer
@pytest.mark.parametrize("name,build", [
    ("t5 tied (scaled)", lambda: t5()),
    ("t5 unscaled", lambda: t5(tie_word_embeddings=False)),
    ("mt5", lambda: mt5()),
    ("llama untied", lambda: llama()),
    ("llama tied", lambda: llama(tie_word_embeddings=True)),
])
def test_output_head_reproduces_the_model_logits(name, build):
    model = build()
    ids, mask = prompts(2, 6)
    with torch.inference_mode():
        if model.config.is_encoder_decoder:
            dec = torch.tensor([[0, 50, 60], [0, 51, 61]])
            out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, output_hidden_states=True)
            hidden = out.decoder_hidden_states[-1]
        else:
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            hidden = out.hidden_states[-1]
        head = OutputHead.of(model)
        torch.testing.assert_close(head.logits(hidden), out.logits, atol=1e-5, rtol=1e-5)
        rows = torch.tensor([5, 60, 61, 99])
        torch.testing.assert_close(head.logits(hidden, rows), out.logits[..., rows], atol=1e-5, rtol=1e-5)
    assert (head.scale != 1.0) == (name == "t5 tied (scaled)")


# ---------------------------------------------------------------- beam search == generate
@pytest.mark.parametrize("kind", ["t5", "mt5", "llama"])
@pytest.mark.parametrize("normalize", ["vocab", "level", "prefix"])
def test_matches_hf_generate_with_a_trie(models, catalogue, kind, normalize):
    seqs, items, index = catalogue
    model = models[kind]
    ids, mask = prompts()
    ours = constrained_beam_search(model, ids, mask, index, BEAM, TOP_K, prefix_tokens=[REC], normalize=normalize)
    ref = hf_beam_search(model, ids, mask, index, BEAM, TOP_K, prefix_tokens=[REC], normalize=normalize)
    assert_valid(*ref, items)
    assert_valid(*ours, items)
    assert_same(ours, ref)


@pytest.mark.parametrize("kind", ["t5", "llama"])
def test_one_row_per_beam_fallbacks_match_too(models, catalogue, kind, monkeypatch):
    """The generic paths (HF decoder with a reordered cache) give the same result as the tree ones."""
    _, items, index = catalogue
    model = models[kind]
    ids, mask = prompts()
    tree = constrained_beam_search(model, ids, mask, index, BEAM, TOP_K, prefix_tokens=[SRC])
    if kind == "t5":
        monkeypatch.setattr(t5_tree.T5TreeState, "supports", classmethod(lambda cls, m: False))
    else:
        monkeypatch.setattr(decoder_states.CausalState, "__init__", _no_tree(decoder_states.CausalState.__init__))
    flat = constrained_beam_search(model, ids, mask, index, BEAM, TOP_K, prefix_tokens=[SRC])
    assert_same(flat, tree)


def test_other_encoder_decoders_use_the_generic_path(catalogue):
    """BART: no T5 fast path, an lm_head plus final_logits_bias; still equal to generate."""
    from transformers import BartConfig, BartForConditionalGeneration

    _, _, index = catalogue
    torch.manual_seed(0)
    model = BartForConditionalGeneration(BartConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=2, eos_token_id=1, decoder_start_token_id=2, init_std=0.2,
        forced_bos_token_id=None, forced_eos_token_id=None)).eval()
    with torch.no_grad():
        model.final_logits_bias.normal_()
    assert not t5_tree.T5TreeState.supports(model)
    ids, mask = prompts()
    assert_same(constrained_beam_search(model, ids, mask, index, BEAM, TOP_K, prefix_tokens=[REC], normalize="vocab"),
                hf_beam_search(model, ids, mask, index, BEAM, TOP_K, prefix_tokens=[REC], normalize="vocab"))


def _no_tree(init):
    def wrapped(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.as_tree = False
    return wrapped


@pytest.mark.parametrize("kind", ["t5", "llama"])
def test_behaviour_token_inside_the_index(models, catalogue, kind):
    """`<rec_item>` as the index's first level instead of a forced prefix: same ranking; in
    "vocab" mode the scores then include that token's log-prob, the same for every item."""
    seqs, items, _ = catalogue
    index = PrefixIndex.from_sequences(torch.cat([torch.full((len(seqs), 1), REC), seqs], dim=1), items)
    model = models[kind]
    ids, mask = prompts()
    ours = constrained_beam_search(model, ids, mask, index, BEAM, TOP_K, normalize="vocab")
    ref = hf_beam_search(model, ids, mask, index, BEAM, TOP_K, normalize="vocab")
    assert_same(ours, ref)
    _, _, plain = catalogue
    forced = constrained_beam_search(model, ids, mask, plain, BEAM, TOP_K, prefix_tokens=[REC], normalize="vocab")
    assert bool(topk_agreement(ours[0], forced[0], forced[1], tol=1e-2).all())
    offset = ours[1] - forced[1]  # log p(<rec_item>), one value per input
    torch.testing.assert_close(offset, offset[:, :1].expand_as(offset), atol=1e-3, rtol=0)
    assert bool((offset < 0).all())


@pytest.mark.parametrize("kind", ["t5", "llama"])
def test_batch_equals_one_by_one(models, catalogue, kind):
    _, _, index = catalogue
    model = models[kind]
    ids, mask = prompts(users=5, seed=11)
    prefix = torch.tensor([[REC], [SRC], [REC], [SRC], [REC]])  # per-row behaviour tokens
    batch = constrained_beam_search(model, ids, mask, index, BEAM, TOP_K, prefix_tokens=prefix)
    for row in range(ids.shape[0]):
        keep = mask[row].bool()  # alone, the input needs no padding
        one = constrained_beam_search(model, ids[row:row + 1, keep], mask[row:row + 1, keep], index, BEAM, TOP_K,
                                      prefix_tokens=prefix[row])
        assert_same(one, (batch[0][row:row + 1], batch[1][row:row + 1]))


def test_small_catalogue_pads_with_minus_one(models):
    index = PrefixIndex.from_sequences(id_tokens(torch.tensor([[1, 2, 3, 4], [1, 2, 3, 5], [2, 0, 0, 0]])),
                                       item_ids=[7, 8, 9])
    ids, mask = prompts(2)
    items, scores = constrained_beam_search(models["t5"], ids, mask, index, beam_size=5, top_k=5)
    assert items.shape == (2, 5)
    assert sorted(items[:, :3].flatten().tolist()) == [7, 7, 8, 8, 9, 9]
    assert (items[:, 3:] == -1).all() and torch.isinf(scores[:, 3:]).all() and torch.isfinite(scores[:, :3]).all()


def test_argument_errors(models, catalogue):
    _, _, index = catalogue
    ids, mask = prompts(2)
    with pytest.raises(ValueError, match="top_k"):
        constrained_beam_search(models["t5"], ids, mask, index, beam_size=4, top_k=5)
    with pytest.raises(ValueError, match="normalize"):
        constrained_beam_search(models["t5"], ids, mask, index, 4, 2, normalize="beam")
    right_padded = torch.ones_like(mask)
    right_padded[0, -2:] = 0
    with pytest.raises(ValueError, match="left-padded"):
        constrained_beam_search(models["llama"], ids, right_padded, index, 4, 2)


def test_training_mode_is_restored(catalogue):
    _, _, index = catalogue
    model = t5(dropout_rate=0.5).train()
    ids, mask = prompts(2)
    first = constrained_beam_search(model, ids, mask, index, 4, 2)
    second = constrained_beam_search(model, ids, mask, index, 4, 2)  # dropout off while decoding
    assert model.training
    assert torch.equal(first[0], second[0])


def test_benchmark_runs_and_agrees(capsys):
    """bench/decode.py end to end on a tiny setting (the timing itself is not asserted)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "decode.py"
    spec = importlib.util.spec_from_file_location("bench_decode", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    report = bench.main(["--items", "150", "--codebook", "16", "--words", "100", "--d-model", "32", "--d-ff", "64",
                         "--layers", "1", "--beam", "6", "--batch", "3", "--top-k", "4", "--batches", "1",
                         "--prompt-len", "10", "--threads", "0"])
    for scoring in ("vocab", "level", "prefix"):  # each of ours ranks as generate scoring the same way
        assert report[f"ours/{scoring}"]["same_topk"] == 1.0 and report[f"ours/{scoring}"]["overlap"] == 1.0
    assert "speed-up over generate" in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["t5", "llama"])
def test_prefix_normalisation_skips_forced_levels(models, catalogue, kind, monkeypatch):
    """With "prefix", a level where every prefix has one continuation scores 0 and needs no
    logits; after the last real choice no decoder pass runs. Still equal to `generate` with the
    same renormalisation."""
    seqs, _, _ = catalogue
    # level 1 is forced by level 0 (a middle forced level), level 3 by levels 0-2 (a forced end)
    forced = seqs.clone()
    forced[:, 1] = ID_BASE + CODEBOOK + (seqs[:, 0] - ID_BASE) % CODEBOOK
    forced[:, 3] = ID_BASE + 3 * CODEBOOK + (seqs[:, 2] - ID_BASE) % CODEBOOK
    index = PrefixIndex.from_sequences(torch.unique(forced, dim=0))
    assert index.width[1] == 1 and index.width[3] == 1 and index.width[2] > 1
    model = models[kind]
    state = t5_tree.T5TreeState if kind == "t5" else decoder_states.CausalState
    calls = []
    advance = state.advance
    monkeypatch.setattr(state, "advance", lambda self, *a: calls.append(1) or advance(self, *a))
    ids, mask = prompts()
    ours = constrained_beam_search(model, ids, mask, index, BEAM, TOP_K, prefix_tokens=[REC], normalize="prefix")
    assert len(calls) == 2  # after levels 0 and 1 (level 1's token must enter the cache); none after 2
    ref = hf_beam_search(model, ids, mask, index, BEAM, TOP_K, prefix_tokens=[REC], normalize="prefix")
    assert_same(ours, ref)
    assert bool((ours[1] <= 0).all())


def test_t5_right_padded_prompts_match_generate(models, catalogue):
    """The packed T5 encoder takes padding anywhere (the ranker right-pads seq2seq prompts)."""
    _, _, index = catalogue
    ids, mask = prompts(users=5, seed=5)
    right_ids, right_mask = torch.zeros_like(ids), torch.zeros_like(mask)
    for row in range(ids.shape[0]):
        real = ids[row][mask[row].bool()]
        right_ids[row, :len(real)], right_mask[row, :len(real)] = real, 1
    model = models["t5"]
    ours = constrained_beam_search(model, right_ids, right_mask, index, BEAM, TOP_K, prefix_tokens=[REC])
    assert_same(ours, hf_beam_search(model, right_ids, right_mask, index, BEAM, TOP_K, prefix_tokens=[REC],
                                     normalize="prefix"))
    assert_same(ours, constrained_beam_search(model, ids, mask, index, BEAM, TOP_K, prefix_tokens=[REC]))


def test_onednn_linear_equals_the_layer_and_follows_weight_updates():
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 8)
    x = torch.randn(3, 5, 16)
    with torch.inference_mode():
        torch.testing.assert_close(onednn.linear(layer, x), layer(x), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        layer.weight.mul_(2.0)  # an optimiser step between two evaluations
    with torch.inference_mode():
        torch.testing.assert_close(onednn.linear(layer, x), layer(x), atol=1e-5, rtol=1e-5)
        wide = torch.nn.Linear(16, 8).double()  # other dtypes: the layer itself
        torch.testing.assert_close(onednn.linear(wide, x.double()), wide(x.double()), atol=0, rtol=0)


# ---------------------------------------------------------------- banned items (a user's history)
def test_allowed_counts_count_unbanned_leaves_below_each_node():
    seqs = torch.tensor([[1, 3], [1, 4], [2, 5]])
    index = PrefixIndex.from_sequences(seqs, item_ids=torch.tensor([10, 11, 12]))
    counts = index.allowed_counts([[], [11], [10, 11], [99]])
    assert counts[0].tolist() == [[3], [2], [1], [3]]
    assert counts[1].tolist() == [[2, 1], [1, 1], [0, 1], [2, 1]]
    assert counts[2].tolist() == [[1, 1, 1], [1, 0, 1], [0, 0, 1], [1, 1, 1]]


@pytest.mark.parametrize("kind", ["t5", "llama"])
@pytest.mark.parametrize("normalize", ["prefix", "vocab"])
def test_banned_items_never_decoded_lists_full_and_equal_decode_all_then_exclude(models, catalogue, kind,
                                                                                  normalize):
    seqs, items, index = catalogue
    ids, mask = prompts(users=4)
    g = torch.Generator().manual_seed(11)
    banned = [items[torch.randperm(ITEMS, generator=g)[: n]] for n in (0, 20, 120, ITEMS - 3)]
    # every item decoded (beam = catalogue), then the banned ones dropped: the exact answer
    all_items, all_scores = constrained_beam_search(models[kind], ids, mask, index, beam_size=ITEMS, top_k=ITEMS,
                                                    normalize=normalize)
    got, got_scores = constrained_beam_search(models[kind], ids, mask, index, beam_size=ITEMS, top_k=TOP_K,
                                              normalize=normalize, banned=banned)
    for row, ban in enumerate(banned):
        keep = ~torch.isin(all_items[row], ban)
        want = all_items[row][keep][:TOP_K]
        assert got[row, :len(want)].tolist() == want.tolist()
        torch.testing.assert_close(got_scores[row, :len(want)], all_scores[row][keep][:TOP_K], rtol=1e-4, atol=1e-4)
    # a real beam: no banned item, full lists where enough items are allowed
    got, _ = constrained_beam_search(models[kind], ids, mask, index, beam_size=BEAM, top_k=TOP_K,
                                     normalize=normalize, banned=banned)
    for row, ban in enumerate(banned):
        allowed = ITEMS - len(ban)
        row_items = got[row][got[row] >= 0]
        assert not torch.isin(row_items, ban).any()
        assert len(row_items) == min(TOP_K, allowed)
        assert set(row_items.tolist()) <= set(items.tolist())


@pytest.mark.parametrize("kind", ["t5", "llama"])
def test_an_ensemble_of_one_model_twice_is_that_model(models, catalogue, kind):
    _, items, index = catalogue
    ids, mask = prompts(users=4)
    banned = [items[:n] for n in (0, 5, 50, 150)]
    one = constrained_beam_search(models[kind], ids, mask, index, BEAM, TOP_K, prefix_tokens=[REC], banned=banned)
    two = constrained_beam_search([models[kind], models[kind]], ids, mask, index, BEAM, TOP_K, prefix_tokens=[REC],
                                  banned=banned)
    assert torch.equal(one[0], two[0])
    torch.testing.assert_close(one[1], two[1])


def mean_teacher_forced(members, seqs, items, normalize: str) -> torch.Tensor:
    """[users, items]: the sum over each item's tokens of the log of the mean probability of
    `members` ((model, input_ids, attention_mask) each: a model and the view of the inputs it
    reads), each member normalised over the same tokens, by teacher forcing."""
    users, n = members[0][1].shape[0], len(items)
    probs = []
    for m, ids, mask in members:
        # prompt + <rec> + the item's tokens, for every item
        full = torch.cat([ids.repeat_interleave(n, 0), torch.full((users * n, 1), REC), seqs.repeat(users, 1)], dim=1)
        full_mask = torch.cat([mask.repeat_interleave(n, 0), torch.ones(users * n, 1 + LEVELS, dtype=mask.dtype)], 1)
        position = (full_mask.cumsum(-1) - 1).clamp_min(0)
        start = ids.shape[1]  # the logits at `start + t` predict the item's token t
        with torch.no_grad():
            logits = m(input_ids=full, attention_mask=full_mask, position_ids=position).logits.float()
        logits = logits[:, start:start + LEVELS]  # [users * n, LEVELS, V]
        if normalize == "prefix":  # over the valid continuations of each prefix
            allowed = torch.zeros_like(logits, dtype=torch.bool)
            for t in range(LEVELS):
                for row, seq in enumerate(seqs.repeat(users, 1)):
                    same = (seqs[:, :t] == seq[:t]).all(1)
                    allowed[row, t, seqs[same, t]] = True
            logits = logits.masked_fill(~allowed, float("-inf"))
        probs.append(torch.softmax(logits, -1).gather(2, seqs.repeat(users, 1)[:, :, None])[..., 0])
    return torch.stack(probs).mean(0).log().sum(-1).view(users, n)


def assert_scores_are(got, got_scores, want, items):
    for row in range(want.shape[0]):
        order = {int(i): s for i, s in zip(items, want[row])}
        torch.testing.assert_close(got_scores[row], torch.stack([order[int(i)] for i in got[row]]),
                                   atol=1e-3, rtol=1e-4)
        assert bool((got_scores[row][:-1] >= got_scores[row][1:]).all())


@pytest.mark.parametrize("normalize", ["prefix", "vocab"])
def test_an_ensemble_decodes_the_mean_of_its_members_next_token_distributions(catalogue, normalize):
    """Beam as wide as the catalogue: every item's score is the sum over its tokens of the log of
    the members' mean probability, each member's normalised over the same tokens (teacher-forced)."""
    seqs, items, index = catalogue
    members = [llama(), llama(initializer_range=0.3)]
    ids, mask = prompts(users=3)
    got, got_scores = constrained_beam_search(members, ids, mask, index, ITEMS, ITEMS, prefix_tokens=[REC],
                                              normalize=normalize)
    want = mean_teacher_forced([(m, ids, mask) for m in members], seqs, items, normalize)
    assert_scores_are(got, got_scores, want, items)


def test_each_member_can_read_its_own_view_of_the_inputs(catalogue):
    """A model that reads each input at two prompt lengths (a view per member) decodes the mean of
    its two next-token distributions, exactly as two models would; one view repeated is the model."""
    seqs, items, index = catalogue
    model = llama()
    long_ids, long_mask = prompts(users=3, length=12)
    short_ids, short_mask = long_ids[:, -5:], long_mask[:, -5:]  # the same prompts, cut to their last 5 tokens
    got, got_scores = constrained_beam_search([model, model], [long_ids, short_ids], [long_mask, short_mask],
                                              index, ITEMS, ITEMS, prefix_tokens=[REC], normalize="vocab")
    want = mean_teacher_forced([(model, long_ids, long_mask), (model, short_ids, short_mask)], seqs, items, "vocab")
    assert_scores_are(got, got_scores, want, items)
    long_only = mean_teacher_forced([(model, long_ids, long_mask)], seqs, items, "vocab")
    assert not torch.allclose(want, long_only, atol=1e-2)  # the short view changes the scores
    one = constrained_beam_search(model, long_ids, long_mask, index, BEAM, TOP_K, prefix_tokens=[REC])
    same = constrained_beam_search([model, model], [long_ids, long_ids], [long_mask, long_mask], index, BEAM, TOP_K,
                                   prefix_tokens=[REC])
    assert torch.equal(one[0], same[0])
    torch.testing.assert_close(one[1], same[1])
    with pytest.raises(ValueError, match="one input batch each"):
        constrained_beam_search([model, model], [long_ids], [long_mask], index, BEAM, TOP_K, prefix_tokens=[REC])
