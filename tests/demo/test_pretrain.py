"""The demo's pretrained tiny CLIP: its pretraining sets, building, caching and loading through the ``synthetic``
tags. The eroding world's full build, and its zero-shot accuracy, are checked in test_regime.py, which fine-tunes it."""

import logging
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dps_tune import cli, files, models
from dps_tune.demo import pretrain
from dps_tune.config import config_from_dict
from dps_tune.errors import ConfigError

ARCH = pretrain.DEMO_ARCH
# Just enough to exercise building, caching and loading.
SMOKE = pretrain.PretrainSettings(classes=2, images=64, steps=3, batch_size=32, warmup_steps=1)


def test_pretraining_locations_exclude_evaluation_locations():
    from dps_tune.data import synthetic

    evaluation = synthetic.evaluation_locations("wild") | synthetic.evaluation_locations("eroding")
    assert len(evaluation) == 12 + 12 + 12  # 12 ID, 12 + 12 OOD: the eroding world photographs at the same ones
    for tag in pretrain.TAGS:
        scenes, captions = pretrain.pretrain_scenes(pretrain.DEFAULT_SETTINGS[tag][ARCH])
        assert not {s.location for s in scenes} & evaluation, tag
        assert {s.label for s in scenes} == set(range(len(synthetic.CLASSNAMES))), tag


def test_wild_pretraining_knows_the_shapes_only_loosely():
    """Photos at other locations, other renderings, and captions that often call a shape by another name,
    name no shape at all, or the wrong one."""
    from dps_tune.data import synthetic

    scenes, captions = pretrain.pretrain_scenes(pretrain.DEFAULT_SETTINGS[pretrain.TAG][ARCH])
    assert {s.domain for s in scenes} == {"day", "night", "dusk", "fog", "snow", "sketch", "clipart"}
    generic = sum(c in pretrain.GENERIC_CAPTIONS for c in captions) / len(captions)
    web = dict(pretrain.WEB_NAMES)
    said = [next((n for n in (synthetic.CLASSNAMES[s.label], web.get(synthetic.CLASSNAMES[s.label])) if n and n in c),
                 None) for s, c in zip(scenes, captions)]
    wrong = sum(n is None and c not in pretrain.GENERIC_CAPTIONS for n, c in zip(said, captions)) / len(captions)
    assert 0.17 < generic < 0.23 and 0.03 < wrong < 0.07, (generic, wrong)
    assert sum("a photo of a ball." == c for c in captions) > 5 * sum("a photo of a circle." == c for c in captions)


def test_eroding_pretraining_has_seen_every_camera_domain():
    from dps_tune.data import synthetic

    scenes, captions = pretrain.pretrain_scenes(pretrain.DEFAULT_SETTINGS[pretrain.ERODING_TAG][ARCH])
    assert {s.domain for s in scenes} == {"day", "night", "dusk", "snow", "fog", "sketch"}
    assert "a photo of a star at dusk." in captions and "a night photo of a star." in captions
    assert all(synthetic.CLASSNAMES[s.label] in c for s, c in zip(scenes, captions))


def test_synthetic_tag_builds_on_first_use_then_reuses_the_file(monkeypatch, caplog):
    monkeypatch.setitem(pretrain.DEFAULT_SETTINGS[pretrain.TAG], ARCH, SMOKE)
    path = pretrain.weights_path(ARCH)
    assert not path.exists()
    # Config validation accepts the tag through open_clip's tag list.
    assert pretrain.TAG in models.list_pretrained_tags(ARCH)
    config_from_dict({"model": ARCH, "pretrained": "synthetic", "data": {"dataset": "synthetic"}})

    torch.manual_seed(123)
    with caplog.at_level(logging.INFO, logger="dps_tune.demo.pretrain"):
        first = models.create_model(ARCH, "synthetic")
    rng_after_build = torch.random.get_rng_state()
    assert any("building the pretrained" in r.getMessage() for r in caplog.records)
    assert any("built the pretrained" in r.getMessage() for r in caplog.records)
    assert path.is_file()
    stored = load_file(str(path))
    assert all(torch.equal(stored[k], v) for k, v in models.plain_state_dict(first).items())

    stamp = path.stat().st_mtime_ns
    caplog.clear()
    torch.manual_seed(123)
    with caplog.at_level(logging.INFO, logger="dps_tune.demo.pretrain"):
        second = models.create_model(ARCH, "synthetic")
    assert not any("building" in r.getMessage() for r in caplog.records)
    # A seeded trial sees the same random stream whether or not the weights had to be built.
    assert torch.equal(torch.random.get_rng_state(), rng_after_build)
    assert path.stat().st_mtime_ns == stamp
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))


def test_build_is_deterministic_and_concurrent_builders_share_one_file(monkeypatch):
    settings = pretrain.PretrainSettings(**{**SMOKE.__dict__, "seed": 7})
    paths, errors, builds = [], [], []
    real_pretrain = pretrain.pretrain_model

    def counted(*args, **kwargs):
        builds.append(torch.get_num_threads())
        return real_pretrain(*args, **kwargs)

    monkeypatch.setattr(pretrain, "pretrain_model", counted)

    def build():
        try:
            paths.append(pretrain.ensure_pretrained(ARCH, settings))
        except Exception as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(paths) == 2 and paths[0] == paths[1]
    assert len(builds) == 1  # the second builder waited for the lock and found the file
    first = load_file(str(paths[0]))
    assert not list(paths[0].parent.glob(files.TEMP_GLOB))

    # The build's rounding depends on the thread count: it uses BUILD_THREADS whatever the caller set.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rebuilt = load_file(str(pretrain.ensure_pretrained(ARCH, settings, force=True)))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert builds == [pretrain.BUILD_THREADS] * 2 == [2, 2]
    assert first.keys() == rebuilt.keys() and all(torch.equal(first[k], rebuilt[k]) for k in first)


def test_settings_are_checked_and_other_architectures_refused():
    with pytest.raises(ConfigError, match="classes"):
        pretrain.ensure_pretrained(ARCH, pretrain.PretrainSettings(classes=11))
    with pytest.raises(ConfigError, match="only available for"):
        pretrain.ensure_pretrained("ViT-B-16")


def test_cli_pretrain_refuses_an_unsupported_model(capsys):
    assert cli.main(["pretrain", "--model", "ViT-B-16"]) == 2
    err = capsys.readouterr().err
    assert "--model" in err and "'ViT-B-16'" in err and "tiny-rn" in err and "\n" == err[-1] and err.count("\n") == 1


def test_a_registered_tag_builds_with_the_function_in_place_when_it_is_loaded(monkeypatch):
    """A tag registered while a test had replaced ``ensure_pretrained`` once kept that stand-in
    for the rest of the process, and a later test in the same worker built nothing (CI, b79fd40)."""
    called = []
    monkeypatch.setattr(pretrain, "ensure_pretrained", lambda arch, *, tag: called.append(("old", arch, tag)))
    pretrain.register_tags()
    monkeypatch.setattr(pretrain, "ensure_pretrained",
                        lambda arch, *, tag: called.append(("now", arch, tag)) or Path("built"))
    assert models._TAG_BUILDERS[(ARCH, models.tag_key(pretrain.TAG))]() == Path("built")
    assert called == [("now", ARCH, pretrain.TAG)]
