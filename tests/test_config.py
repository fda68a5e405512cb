"""The one typed config: defaults run, YAML + overrides merge, bad input says what and where."""
from __future__ import annotations

from pathlib import Path

import pytest

from gensar_core.config import ConfigError, PipelineConfig, load_config, with_overrides


def test_defaults_are_the_embedded_default(monkeypatch, tmp_path):
    monkeypatch.setenv("GENSAR_HOME", str(tmp_path))
    cfg = load_config()
    assert cfg.data.source.kind == "movielens" and cfg.data.source.path is None
    assert cfg.warehouse == tmp_path / "warehouse"
    assert cfg.split.strategy == "leave_one_out"


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("split:\n  kcore: 5\n  max_rec_history: 3\ndata:\n  source:\n    kind: generic\n"
                 "    events: /e.csv\n    items: /i.csv\n")
    cfg = load_config(f, ["split.kcore=10", "data.search.share=0.5", "ds=2026-11-27"])
    assert (cfg.split.kcore, cfg.split.max_rec_history, cfg.data.search.share) == (10, 3, 0.5)
    assert cfg.data.source.kind == "generic" and str(cfg.data.source.events) == "/e.csv"
    assert cfg.ds == "2026-11-27"


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"split\.kcroe: unknown key"):
        load_config(None, ["split.kcroe=3"])
    f = tmp_path / "c.yaml"
    f.write_text("spark:\n  mastr: local[4]\n")
    with pytest.raises(ConfigError, match=rf"{f}.*\n.*spark\.mastr: unknown key"):
        load_config(f)


@pytest.mark.parametrize("override, where", [
    ("split.kcore=-1", "split.kcore"),
    ("data.search.share=1.5", "data.search.share"),
    ("split.strategy=random", "split.strategy"),
    ("ds=27/11/2026", "ds"),
    ("data.source.kind=csv", "data.source"),
    ("split.train_share=0.95", "split: Value error, train_share"),
    ('evaluate.seeds={"rec-only": [7]}', "evaluate.seeds names"),  # not a variant
])
def test_bad_values_are_named(override, where):
    with pytest.raises(ConfigError, match=where.replace(".", r"\.")):
        load_config(None, [override])


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    f = tmp_path / "bad.yaml"
    f.write_text("split: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(f)
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(None, ["kcore"])


def test_fingerprint_tracks_content():
    a, b = PipelineConfig(warehouse="/w"), PipelineConfig(warehouse="/w")
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != PipelineConfig(warehouse="/w", seed=1).fingerprint()


def test_shipped_configs_load_and_differ_from_the_defaults_as_they_say():
    root = Path(__file__).resolve().parents[1] / "configs"
    shipped = {f.stem: load_config(f) for f in sorted(root.glob("*.yaml"))}
    assert set(shipped) == {"default", "ablations", "amazon", "amazon-office", "generic", "kuaisar"}
    assert shipped["default"] == PipelineConfig()
    assert [shipped[name].data.source.kind for name in ("amazon", "amazon-office", "generic", "kuaisar")] == [
        "amazon", "inter_json", "generic", "kuaisar"]
    ablations = shipped["ablations"]
    assert {"gensar-rec-only", "gensar-search-only", "tiger-style", "gensar-prompted-t5"} <= set(ablations.evaluate.variants)
    variants = {name: with_overrides(ablations, o) for name, o in ablations.evaluate.variants.items()}
    assert variants["gensar-prompted-t5"].model.formulation == "prompted"
    assert not variants["gensar-rec-only"].corpus.tasks.search.enabled


def test_the_typed_defaults_are_the_embedded_default_run():
    """configs/default.yaml holds nothing the config class does not already say."""
    root = Path(__file__).resolve().parents[1]
    assert load_config(root / "configs" / "default.yaml") == PipelineConfig()
    cfg = PipelineConfig()
    assert (cfg.model.formulation, cfg.identifiers.mode, cfg.identifiers.codebook_size) == ("timeline", "incremental", "auto")
    assert (cfg.train.epochs, cfg.model.prompted.init_from_champion) == (20, True)


def test_config_sources_say_where_each_value_came_from(tmp_path):
    from gensar_core.config import config_sources, with_overrides

    f = tmp_path / "mine.yaml"
    f.write_text("split:\n  kcore: 5\ntrain:\n  epochs: 4\n")
    layer = {"variant v": ["train.epochs=2"]}
    cfg = with_overrides(load_config(f, ["seed=7"]), layer["variant v"])
    sources = {key: (value, source) for key, value, source in config_sources(cfg, f, ["seed=7"], layer)}
    assert sources["split.kcore"] == (5, str(f))
    assert sources["seed"] == (7, "--set")
    assert sources["train.epochs"] == (2, "variant v")
    assert sources["train.lr"] == (PipelineConfig().train.lr, "default")
    assert set(sources) >= {"data.source.kind", "model.timeline.max_len", "evaluate.beam_size"}


def test_a_corpus_setting_the_timeline_model_never_reads_is_an_error_naming_it():
    with pytest.raises(ConfigError, match=r"corpus\.max_text_words, corpus\.tasks\.rec\.weight: read only by the prompted"):
        load_config(None, ["corpus.tasks.rec.weight=2", "corpus.max_text_words=10"])
    prompted = load_config(None, ["corpus.tasks.rec.weight=2", "model.formulation=prompted"])
    assert prompted.corpus.tasks.rec.weight == 2.0


def test_a_partial_task_setting_keeps_the_tasks_other_defaults():
    """The DAG's `tasks` param sets only `enabled`: the ad-hoc task keeps its two templates."""
    cfg = load_config(None, ["corpus.tasks.adhoc.enabled=true", "corpus.tasks.rec.enabled=false"])
    assert cfg.corpus.tasks.adhoc.templates_per_example == 2 and cfg.corpus.tasks.rec.templates_per_example == 1
    assert cfg.corpus == load_config(None, ["corpus.tasks.rec.enabled=false"]).corpus
