"""Rules written once: the method order, the split of ``--set`` overrides, the walk over the config tree."""

from __future__ import annotations

import random

import pytest

from support.worlds import tiny_raw
from dps_tune.config import CONFIG_KEYS, TuneConfig, config_from_dict, leaves, split_overrides, to_dict
from dps_tune.errors import ConfigError
from dps_tune.sweep import candidates, confirm, results
from support.experiments import write_experiment


def test_every_method_has_its_place_in_the_one_order():
    arms = [results.method_name({"algorithm": "dps", "dps": {"suppress": s, "masking": 0.5}})
            for s in ("top", "random", "bottom", "random_global")]
    named = ["ce", "flyp", *arms, results.method_name({"algorithm": "dps", "dps": {"masking": 1.0}})]
    assert tuple(named) == results.METHOD_ORDER
    shuffled = [*named, "zeta", "alpha", "ce"]
    random.Random(0).shuffle(shuffled)
    assert results.in_method_order(shuffled) == [*named, "alpha", "zeta"]


def test_the_best_per_method_and_the_ensemble_candidates_come_in_the_one_order(tmp_path):
    dps = {"algorithm": "dps", "dps.reference": "/ref", "dps.masking": 0.5}
    exp = write_experiment(tmp_path, "exp", [
        ("t0", {**dps, "dps.suppress": "random"}, 2, 0.9), ("t1", {"algorithm": "flyp"}, 2, 0.8),
        ("t2", {**dps, "dps.suppress": "top"}, 2, 0.7), ("t3", {}, 2, 0.6)])
    expected = ["ce", "flyp", "dps (top)", "dps (random)"]
    assert [b["method"] for b in results.best_per_method([exp], "id_val_f1")] == expected
    assert list(candidates.load_candidates([exp], "id_val_f1")) == expected


def test_overrides_split_into_the_base_configs_and_the_tune_blocks():
    base, tune = split_overrides(["lr=0.001", "tune.num_samples=4", "masking=0.5", "tune.metric=ood_val_f1"])
    assert base == {"optim.lr": 1e-3, "dps.masking": 0.5}
    assert tune == {"num_samples": 4, "metric": "ood_val_f1"}
    assert split_overrides({"epochs": 2, "tune.max_t": 1}) == ({"optim.epochs": 2}, {"max_t": 1})
    assert split_overrides([]) == ({}, {})
    with pytest.raises(ConfigError, match="unknown key 'tune.samples'"):
        split_overrides(["tune.samples=4"])


def test_the_walk_gives_every_leaf_once_with_its_json_value():
    cfg = config_from_dict(tiny_raw(**{"data.eval_csvs": {"id_val": "/v.csv", "ood_test": "/t.csv"}}))
    walked = {key: value for key, _, value in leaves(cfg)}
    assert list(walked) == list(CONFIG_KEYS)  # the schema's keys, in its order
    assert walked["data.eval_csvs"] == {"id_val": "/v.csv", "ood_test": "/t.csv"}  # pairs: one mapping
    assert walked["data.eval_splits"] == list(cfg.data.eval_splits) and walked["optim.lr"] == cfg.optim.lr
    assert config_from_dict(to_dict(cfg)) == cfg  # to_dict is the walk, nested back
    types = {key: tp for key, tp, _ in leaves(TuneConfig())}
    assert types["metric"] == str | tuple[str, ...] and list(types) == list(to_dict(TuneConfig()))


def test_a_confirmation_overrides_only_what_differs_and_eval_csvs_as_a_whole():
    base = config_from_dict(tiny_raw(**{"data.eval_csvs": {"id_val": "/v.csv"}}))
    other = config_from_dict(tiny_raw(**{"data.eval_csvs": {"id_val": "/v.csv", "ood_test": "/t.csv"},
                                         "optim.lr": 0.5}))
    assert confirm.overrides(base, other) == {"data.eval_csvs": {"id_val": "/v.csv", "ood_test": "/t.csv"},
                                              "optim.lr": 0.5}
    assert confirm.overrides(base, base) == {}


def test_every_path_of_eval_csvs_is_made_absolute_like_the_other_path_fields(write_yaml, tmp_path, monkeypatch):
    from dps_tune.config import load_file

    (tmp_path / "work").mkdir()
    path = write_yaml(tiny_raw(**{"data.eval_csvs": {"id_val": "v.csv", "ood_test": "/abs/t.csv"},
                                  "data.classnames": "names.txt"}))
    monkeypatch.chdir(tmp_path / "work")
    data = load_file(path).config.data
    assert dict(data.eval_csvs) == {"id_val": str(tmp_path / "work" / "v.csv"), "ood_test": "/abs/t.csv"}
    assert data.classnames == str(tmp_path / "work" / "names.txt")
