"""The eroding world shows its regime on a reduced build (fewer classes, images, steps and epochs):
zero-shot is robust and fine-tuning erodes it, so WiSE-FT's interior alphas beat both ends on
OOD test accuracy, as in CLIP on ImageNet and its shifts.

The wild world's regime (fine-tuning lifts ID and OOD, the shift costs CE) is checked on the
demo's own run (tests/demo/test_study.py); a reduced build of it learns too little to show it.
"""

import dataclasses

import pytest

from dps_tune import checkpoint as ckpt
from dps_tune import weight_space
from dps_tune.config import config_from_dict
from dps_tune.demo import pretrain
from dps_tune.train import run_trial

ARCH = pretrain.DEMO_ARCH
CLASSES = 4
SMALL = dict(classes=CLASSES, images=1500, steps=900, batch_size=64, warmup_steps=30)
EVAL_PER_CLASS = 150  # 600 images per split: a binomial standard error of at most 0.02


def _config(world: str, weights: str, **optim):
    return config_from_dict({
        "algorithm": "ce", "model": ARCH, "pretrained": weights, "seed": 0,
        "data": {"dataset": "synthetic", "batch_size": 32, "eval_batch_size": 256, "workers": 0,
                 "synthetic": {"world": world, "classes": CLASSES, "train_per_class": 100,
                               "eval_per_class": EVAL_PER_CLASS}},
        "optim": {"lr": 1e-3, "wd": 0.1, "epochs": 3, "warmup_steps": 10, **optim},
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
