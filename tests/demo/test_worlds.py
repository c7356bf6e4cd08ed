"""Each synthetic world shows its regime on a reduced build: fewer classes, images, steps and epochs.

* wild (iWildCam's regime): zero-shot above chance but far from solved; CE fine-tuning
  lifts both ID and OOD test accuracy, and the shift to new locations costs it accuracy;
* eroding (CLIP on ImageNet's regime): zero-shot is robust and fine-tuning erodes it, so
  WiSE-FT's interior alphas beat both ends on OOD test accuracy.
"""

import dataclasses
import math

import pytest

from dps_tune import checkpoint as ckpt
from dps_tune import weight_space
from dps_tune.config import config_from_dict
from dps_tune.demo import pretrain
from dps_tune.train import evaluate_start, run_trial

ARCH = pretrain.DEMO_ARCH
CLASSES = 6  # circle, square, triangle, star, cross, heart: four of them renamed on the web
SMALL = dict(classes=CLASSES, images=1500, steps=900, batch_size=64, warmup_steps=30)
EVAL_PER_CLASS = 100  # 600 images per split: a binomial standard error of at most 0.02
CHANCE = 1 / CLASSES


def _config(world: str, weights: str, **optim):
    return config_from_dict({
        "algorithm": "ce", "model": ARCH, "pretrained": weights, "seed": 0,
        "data": {"dataset": "synthetic", "batch_size": 32, "eval_batch_size": 256, "workers": 0,
                 "synthetic": {"world": world, "classes": CLASSES, "train_per_class": 100,
                               "eval_per_class": EVAL_PER_CLASS}},
        "optim": {"lr": 2e-3, "wd": 0.1, "epochs": 6, "warmup_steps": 10, **optim},
        "train": {"device": "cpu", "precision": "fp32", "compile": "off"},
    })


def _fine_tune(cfg, tmp_path):
    kept = []

    def report(metrics, path):
        if path is not None:
            kept[:] = [ckpt.load_checkpoint(path, with_state=False).model_state]

    final = run_trial(cfg, report, work_dir=tmp_path / "work")
    return final, kept[0]


@pytest.mark.slow
def test_wild_world_is_in_iwildcams_regime(tmp_path):
    settings = dataclasses.replace(pretrain.DEFAULT_SETTINGS[pretrain.TAG][ARCH], **SMALL)
    weights = str(pretrain.ensure_pretrained(ARCH, settings, tag=pretrain.TAG))
    cfg = _config("wild", weights)
    zero_shot = evaluate_start(cfg)
    ce, _ = _fine_tune(cfg, tmp_path)
    se = math.sqrt(0.25 / (CLASSES * EVAL_PER_CLASS))
    figures = {"zero_shot": zero_shot, "ce": ce}
    # zero-shot: well above chance, far from solved
    assert CHANCE + 6 * se < zero_shot["id_test_acc"] < 0.8, figures
    # fine-tuning lifts both sides by at least 0.10
    assert ce["id_test_acc"] >= zero_shot["id_test_acc"] + 0.10, figures
    assert ce["ood_test_acc"] >= zero_shot["ood_test_acc"] + 0.10, figures
    # the shift to new locations costs something
    assert ce["ood_test_acc"] <= ce["id_test_acc"] - 0.08, figures


@pytest.mark.slow
def test_eroding_world_rewards_an_interior_wise_ft_alpha(tmp_path):
    settings = dataclasses.replace(pretrain.DEFAULT_SETTINGS[pretrain.ERODING_TAG][ARCH], **SMALL)
    weights = str(pretrain.ensure_pretrained(ARCH, settings, tag=pretrain.ERODING_TAG))
    cfg = _config("eroding", weights)
    _, theta1 = _fine_tune(cfg, tmp_path)
    ev = weight_space.Evaluator(cfg)
    ood = {a: ev(weight_space.interpolate(ev.theta0, theta1, a), splits=["ood_test"])["ood_test_acc"]
           for a in (0.0, 0.25, 0.5, 0.75, 1.0)}
    # zero-shot is robust and fine-tuning erodes it ...
    assert ood[1.0] < ood[0.0], ood
    # ... and an interior alpha beats both ends on OOD test accuracy, as WiSE-FT reports
    assert max(ood[0.25], ood[0.5], ood[0.75]) > max(ood[0.0], ood[1.0]), ood
