import json
import logging
import math
import shutil

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from dps_tune.data import datasets as data_mod
from dps_tune import models
from dps_tune.checkpoint import load_checkpoint
from dps_tune.errors import TrainingError
from dps_tune.evaluate import evaluate_splits, tokenize_prompts
from dps_tune.methods import Batch, CEObjective, FLYPObjective
from dps_tune.objectives import SPLITS, metric_names
from dps_tune.sweep import reference
from dps_tune.train import run_trial


class Recorder:
    """A report callback that keeps every metric dict and copies every checkpoint.

    With ``stop_after=n`` it raises :class:`Stop` after keeping the n-th report, as a
    trial killed right after a checkpoint would end.
    """

    def __init__(self, keep_dir=None, stop_after=None):
        self.metrics, self.checkpoints, self.keep_dir, self.stop_after = [], [], keep_dir, stop_after

    def __call__(self, metrics, checkpoint_dir):
        self.metrics.append(dict(metrics))
        if checkpoint_dir is not None and self.keep_dir is not None:
            dst = self.keep_dir / f"ckpt{len(self.metrics)}"
            shutil.copytree(checkpoint_dir, dst)
            self.checkpoints.append(dst)
        if self.stop_after is not None and len(self.metrics) == self.stop_after:
            raise Stop


class Stop(Exception):
    pass


def ranked(cfg):
    """``cfg`` with its DPS reference resolved, and the ranking (None unless DPS), as the CLI does."""
    resolved = reference.resolve(cfg)
    return resolved.config, resolved.ranking


@pytest.fixture
def reference_file(tmp_path):
    """A stand-in for a CE fine-tune of tiny-vit: θ0 moved by noise of row-dependent size."""
    torch.manual_seed(0)
    theta0 = models.plain_state_dict(models.create_model("tiny-vit", "none"))
    gen = torch.Generator().manual_seed(1)
    theta1 = {k: v + 0.01 * torch.randn(v.shape, generator=gen) * torch.rand(v.shape[:1] + (1,) * (v.dim() - 1),
                                                                                generator=gen)
              if v.dim() >= 1 else v for k, v in theta0.items()}
    path = tmp_path / "reference.safetensors"
    save_file(theta1, str(path))
    return path


@pytest.mark.parametrize("algorithm", ["ce", "flyp", "dps"])
def test_each_algorithm_trains_one_epoch_and_reports_every_split(algorithm, tiny_config, reference_file):
    cfg, ranking = ranked(tiny_config(algorithm=algorithm, **{"dps.reference": str(reference_file),
                                                              "dps.masking": 0.5}))
    rec = Recorder()
    final = run_trial(cfg, rec, ranking=ranking)
    assert len(rec.metrics) == 1
    m = rec.metrics[0]
    for name in metric_names(SPLITS) + ["epoch", "step", "train_loss", "lr", "samples_per_s"]:
        assert name in m, name
        assert math.isfinite(m[name])
    assert m["epoch"] == 1.0 and m["step"] == (32 if algorithm != "flyp" else 64) // 8
    assert 0 <= m["ood_test_acc"] <= 1 and 0 <= m["ood_test_f1"] <= 1
    assert final == m


def _fixed_batch(n=16):
    cfg_world = data_mod.DataConfig(dataset="synthetic", synthetic=data_mod.DataConfig().synthetic.__class__(
        classes=4, train_per_class=8, eval_per_class=4, image_size=32))
    spec = data_mod.load_dataset(cfg_world)
    model = models.create_model("tiny-vit", "none")
    pre = models.preprocess_cfg(model)
    tf = data_mod.TrainTransform(32, pre.mean, pre.std)
    recs = spec.train_pairs
    # one image per distinct caption, so the contrastive targets are unambiguous
    first = {}
    for i, caption in enumerate(recs.captions):
        first.setdefault(caption, i)
    pick = list(first.values())[:n]
    images = torch.stack([tf(data_mod.open_image(recs.paths[i], ""), torch.Generator().manual_seed(i))
                          for i in pick])
    labels = torch.tensor([recs.labels[i] for i in pick])
    tok = models.get_tokenizer("tiny-vit")
    return spec, images, labels, tok([recs.captions[i] for i in pick]), tok


@pytest.mark.parametrize("kind", ["ce", "flyp"])
def test_loss_falls_on_a_fixed_batch(kind):
    torch.manual_seed(0)
    spec, images, labels, texts, tok = _fixed_batch()
    model = models.create_model("tiny-vit", "none")
    prompts = tokenize_prompts(tok, spec.classnames, spec.templates)
    objective = CEObjective(prompts, seed=0) if kind == "ce" else FLYPObjective()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.1)
    batch = Batch(images, labels, texts)
    losses = []
    for _ in range(20):
        loss = objective.loss(model, batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_checkpoint_round_trip_gives_identical_metrics(tiny_config, tmp_path):
    cfg = tiny_config()
    rec = Recorder(tmp_path)
    run_trial(cfg, rec)
    ck = rec.checkpoints[-1]
    assert {p.name for p in ck.iterdir()} == {"model.safetensors", "config.json", "metrics.json", "train_state.pt",
                                              "predictions.safetensors"}
    assert json.loads((ck / "config.json").read_text())["model"] == "tiny-vit"
    # plain open_clip loads the file, and re-evaluating reproduces the recorded metrics exactly
    model = open_clip.create_model("tiny-vit", pretrained=str(ck / "model.safetensors"))
    spec = data_mod.load_dataset(cfg.data)
    prompts = tokenize_prompts(models.get_tokenizer("tiny-vit"), spec.classnames, spec.templates)
    tf = models.eval_transform(model)
    loaders = {s: data_mod.eval_loader(r, tf, batch_size=64, workers=0) for s, r in spec.splits.items()}
    again = evaluate_splits(model, prompts, loaders)
    recorded = load_checkpoint(ck).metrics
    for key, value in again.items():
        assert value == recorded[key], key
    # the recorded predictions are the ones behind the metrics (what bootstrap intervals resample)
    from dps_tune.checkpoint import read_predictions
    from dps_tune.metrics import classification_metrics

    preds = read_predictions(ck)
    assert set(preds) == set(spec.splits)
    for split, (y_true, y_pred) in preds.items():
        assert classification_metrics(split, y_true, y_pred) == {k: recorded[k] for k in (f"{split}_acc", f"{split}_f1")}


@pytest.mark.parametrize("eval_every", [0, 3])
def test_resume_continues_exactly(tiny_config, tmp_path, eval_every):
    """A run stopped right after its first report, then resumed, ends bit-identical to an unbroken run."""
    cfg = tiny_config(**{"optim.epochs": 2, "train.eval_every_steps": eval_every})
    full = Recorder(tmp_path / "full")
    run_trial(cfg, full)
    stopped = Recorder(tmp_path / "stopped", stop_after=1)
    with pytest.raises(Stop):
        run_trial(cfg, stopped)
    assert len(stopped.metrics) == 1 and len(full.metrics) >= 2
    resumed = Recorder(tmp_path / "resumed")
    run_trial(cfg, resumed, resume_from=stopped.checkpoints[0])
    assert [m["step"] for m in resumed.metrics] == [m["step"] for m in full.metrics][1:]
    a = load_checkpoint(full.checkpoints[-1]).model_state
    b = load_checkpoint(resumed.checkpoints[-1]).model_state
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.metrics[-1]["id_val_acc"] == full.metrics[-1]["id_val_acc"]


def test_nan_loss_stops_with_the_step(tiny_config, monkeypatch):
    original = CEObjective.loss
    calls = {"n": 0}

    def poisoned(self, model, batch):
        out = original(self, model, batch)
        calls["n"] += 1
        if calls["n"] == 4:  # the 4th step is step 3 (0-based)
            out = {"loss": out["loss"] * float("nan")}
        return out

    monkeypatch.setattr(CEObjective, "loss", poisoned)
    with pytest.raises(TrainingError, match="NaN or infinite at step 3"):
        run_trial(tiny_config(), Recorder())


def test_loss_is_logged_every_log_every_steps_without_a_progress_bar(tiny_config, caplog):
    """Sweeps run without a bar: the log is their only sign of life between evaluations."""
    caplog.set_level(logging.INFO, logger="dps_tune.train")
    run_trial(tiny_config(**{"train.log_every_steps": 2}), progress=False)  # 4 steps
    lines = [r.getMessage() for r in caplog.records if "loss" in r.getMessage()]
    assert [line.split()[1] for line in lines] == ["2/4", "4/4"], lines


def test_dps_without_a_ranking_is_refused_before_any_work(tiny_config, reference_file):
    cfg = tiny_config(algorithm="dps", **{"dps.reference": str(reference_file)})
    with pytest.raises(TrainingError, match="needs the DPS ranking"):
        run_trial(cfg)


@pytest.mark.parametrize("share,says", [(0.5, "with 0.5 of the GPU"), (None, "with the whole GPU")])
def test_out_of_memory_names_the_batch_size_and_the_gpu_share(tiny_config, monkeypatch, share, says):
    """The message a fractional-GPU trial ends with (raised here on the CPU, where the share is not applied)."""
    from dps_tune import train

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train, "train_step", oom)
    with pytest.raises(TrainingError, match=f"CUDA out of memory at data.batch_size=8 {says}; lower the batch"):
        run_trial(tiny_config(), memory_fraction=share)


def test_the_same_seed_on_the_same_machine_gives_the_same_metrics(tiny_config):
    """One trial run twice: identical figures, every split; another seed gives others."""
    cfg = tiny_config(**{"optim.epochs": 2})
    first, second = run_trial(cfg), run_trial(cfg)
    figures = [k for k in first if k.endswith(("_acc", "_f1", "train_loss"))]
    assert figures and all(first[k] == second[k] for k in figures)
    other = run_trial(tiny_config(**{"optim.epochs": 2, "seed": 1}))
    assert any(other[k] != first[k] for k in figures)


@pytest.mark.parametrize("mode", ["frozen", "update"])
def test_batchnorm_statistics_move_only_when_asked(tiny_config, tmp_path, mode):
    """tiny-rn (CLIP's ResNet layout, with BatchNorm) fine-tuned two epochs, evaluated after each: frozen, every
    BatchNorm layer keeps the pretrained running statistics bit for bit (the evaluation between the epochs puts
    them back in eval mode, not in training mode) while its affine weights train; "update" re-estimates them on
    the training batches, state that no method's optimizer controls."""
    from safetensors.torch import load_file

    cfg = tiny_config(**{"model": "tiny-rn", "train.batchnorm": mode, "optim.epochs": 2})
    start = models.create_model("tiny-rn", cfg.pretrained)
    bn = {name for name, m in start.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    assert len(bn) > 10  # the stem's, every bottleneck's and the downsamples'
    models.set_training(start, batchnorm=mode)
    assert all(m.training == (mode == "update") for name, m in start.named_modules() if name in bn)
    assert all(m.training for name, m in start.named_modules() if name and name not in bn)
    before = models.plain_state_dict(start)
    rec = Recorder(tmp_path)
    run_trial(cfg, rec)
    after = load_file(str(rec.checkpoints[-1] / "model.safetensors"))
    stats = [f"{name}.{b}" for name in bn for b in ("running_mean", "running_var")]
    affine = [f"{name}.weight" for name in bn]
    unchanged = [k for k in stats if torch.equal(before[k], after[k])]
    if mode == "frozen":
        assert unchanged == stats
        assert all(int(after[f"{name}.num_batches_tracked"]) == int(before[f"{name}.num_batches_tracked"])
                   for name in bn)
    else:
        assert not unchanged
    assert any(not torch.equal(before[k], after[k]) for k in affine)  # the affine weights train either way
