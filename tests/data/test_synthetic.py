"""The two synthetic worlds: where each split is photographed, under which conditions, at what size."""

import csv
from collections import Counter

import pytest

from dps_tune.config import SyntheticConfig, config_from_dict
from dps_tune.data import synthetic
from dps_tune.errors import ConfigError


def _rows(root, split):
    with open(root / f"{split}.csv") as f:
        return list(csv.DictReader(f, delimiter="\t"))


@pytest.fixture(scope="module")
def wild(tmp_path_factory):
    cfg = SyntheticConfig(world="wild", classes=4, train_per_class=30, eval_per_class=40, image_size=32)
    return synthetic.generate(cfg, tmp_path_factory.mktemp("wild") / "w")


def test_default_world_is_wild_with_evaluation_splits_of_1000_images():
    cfg = SyntheticConfig()
    assert cfg.world == "wild"
    assert cfg.classes * cfg.eval_per_class >= 1000
    layout = synthetic.LAYOUTS["wild"]
    for split in ("ood_val", "ood_test"):
        assert len(layout.locations[split]) >= 10, split


def test_wild_ood_is_new_locations_under_every_condition(wild):
    id_locations = {r["location"] for split in ("train", "id_val", "id_test") for r in _rows(wild, split)}
    val = {r["location"] for r in _rows(wild, "ood_val")}
    test = {r["location"] for r in _rows(wild, "ood_test")}
    assert not (id_locations & val) and not (id_locations & test) and not (val & test)
    assert len(val) >= 10 and len(test) >= 10
    for split in ("train", "id_test", "ood_test"):
        domains = Counter(r["domain"] for r in _rows(wild, split))
        # both sides mix times of day and weather
        assert {"day", "night", "dusk"} <= set(domains), (split, domains)
        assert 0.45 < domains["day"] / sum(domains.values()) < 0.75, (split, domains)


def test_wild_splits_are_class_balanced_but_locations_are_not(wild):
    for split in ("id_val", "ood_test"):
        rows = _rows(wild, split)
        assert Counter(r["label"] for r in rows) == {str(c): 40 for c in range(4)}
        # each camera sees some classes far more often than others
        by_location = Counter((r["location"], r["label"]) for r in rows)
        skewed = 0
        for loc in {r["location"] for r in rows}:
            counts = [by_location[(loc, str(c))] for c in range(4)]
            skewed += max(counts) >= 2 * max(1, min(counts))
        assert skewed >= len({r["location"] for r in rows}) // 2, split


def test_wild_ood_cameras_see_their_subject_differently():
    id_views = [synthetic.location_view("wild", loc) for loc in synthetic.LAYOUTS["wild"].locations["id_val"]]
    ood_views = [synthetic.location_view("wild", loc) for loc in synthetic.LAYOUTS["wild"].locations["ood_test"]]
    mean = lambda views, f: sum(map(f, views)) / len(views)  # noqa: E731
    # every camera at its own distance, drawn from one range on both sides
    assert len({v.size for v in id_views + ood_views}) == len(id_views + ood_views)
    assert all(0.8 * 0.27 <= v.size[0] and v.size[1] <= 1.2 * 0.33 for v in id_views + ood_views)
    assert mean(ood_views, lambda v: v.squash) < mean(id_views, lambda v: v.squash)  # tilted
    assert mean(ood_views, lambda v: v.clutter) > mean(id_views, lambda v: v.clutter)  # behind branches


def test_eroding_world_is_daylight_id_and_dusk_ood(tmp_path):
    cfg = SyntheticConfig(world="eroding", classes=4, train_per_class=5, eval_per_class=5, image_size=32)
    root = synthetic.generate(cfg, tmp_path / "e")
    for split in ("train", "id_val", "id_test"):
        assert {r["domain"] for r in _rows(root, split)} == {"day"}
        assert {int(r["location"]) for r in _rows(root, split)} <= set(range(12))
    for split in ("ood_val", "ood_test"):
        assert {r["domain"] for r in _rows(root, split)} == {"dusk"}
        assert {int(r["location"]) for r in _rows(root, split)} <= set(synthetic.LAYOUTS["eroding"].locations[split])
    assert all(len(synthetic.LAYOUTS["eroding"].locations[s]) >= 10 for s in ("ood_val", "ood_test"))
    assert synthetic.world_key(cfg) != synthetic.world_key(SyntheticConfig(**{**cfg.__dict__, "world": "wild"}))


def test_unknown_world_is_refused_with_its_key():
    with pytest.raises(ConfigError, match=r"data\.synthetic\.world.*'moon'.*wild, eroding"):
        config_from_dict({"model": "tiny-vit", "pretrained": "none",
                          "data": {"dataset": "synthetic", "synthetic": {"world": "moon"}}})
