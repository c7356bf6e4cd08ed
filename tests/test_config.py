import dataclasses
import re

import pytest

from dps_tune import cli
from dps_tune.config import (Config, config_from_dict, load_file, parse_override, resolve_key, to_dict,
                             with_overrides)
from dps_tune.errors import ConfigError
from support.cli import run_cli
from support.worlds import tiny_raw


def test_round_trip_and_frozen(tiny_config):
    cfg = tiny_config()
    assert config_from_dict(to_dict(cfg)) == cfg
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.lr = 1.0  # type: ignore[misc]


def test_leaf_keys_and_overrides(tiny_config):
    assert resolve_key("lr") == "optim.lr"
    assert resolve_key("masking") == "dps.masking"
    assert parse_override("epochs=3") == ("optim.epochs", 3)
    assert parse_override("optim.lr=1e-4") == ("optim.lr", "1e-4")  # YAML reads 1e-4 as text...
    cfg = with_overrides(tiny_config(), {"lr": "1e-4", "data.batch_size": 4})
    assert cfg.optim.lr == pytest.approx(1e-4)  # ...and the float field accepts it
    assert cfg.data.batch_size == 4


def test_dps_variants_are_keys_a_search_can_set(tiny_config):
    cfg = tiny_config()
    assert (cfg.dps.quota, cfg.dps.exclude) == ("global", ("bias", "positional_embedding", "ln"))
    # A comma-separated string is a list, so a search choice can name a list of patterns.
    cfg = with_overrides(cfg, {"exclude": "bias, positional_embedding,ln,token_embedding", "quota": "per_tensor",
                               "masking": 1.0})
    assert cfg.dps.exclude == ("bias", "positional_embedding", "ln", "token_embedding")
    assert (cfg.dps.quota, cfg.dps.masking) == ("per_tensor", 1.0)
    assert config_from_dict(to_dict(cfg)) == cfg


def test_exact_key_wins_over_leaf_name():
    assert resolve_key("seed") == "seed"  # not data.synthetic.seed
    assert resolve_key("data.synthetic.seed") == "data.synthetic.seed"
    with pytest.raises(ConfigError, match="unknown key 'sed'"):
        resolve_key("sed")


def test_paths_made_absolute(write_yaml, tmp_path, monkeypatch):
    """Relative paths are taken from the current directory, not from the config file's folder."""
    (tmp_path / "work" / "ref").mkdir(parents=True)
    path = write_yaml(tiny_raw(**{"algorithm": "dps", "dps.reference": "ref"}))  # in tmp_path, not in work/
    monkeypatch.chdir(tmp_path / "work")
    cfg = load_file(path).config
    assert cfg.dps.reference == str(tmp_path / "work" / "ref")


BAD = [
    ({"bogus": 1}, "unknown key bogus"),
    ({"optim.bogus": 1}, "unknown key optim.bogus"),
    ({"optim.epochs": "many"}, "optim.epochs = 'many': expected an integer"),
    ({"optim.lr": 0}, "optim.lr = 0.0: must be > 0"),
    ({"optim.lr": -1e-5}, "optim.lr = -1e-05: must be > 0"),
    ({"optim.wd": -0.1}, "optim.wd = -0.1: must be >= 0"),
    ({"dps.masking": 1.01}, "dps.masking = 1.01: must be in [0, 1]"),
    ({"dps.masking": -0.1}, "dps.masking = -0.1: must be in [0, 1]"),
    ({"dps.quota": "per_row"}, "dps.quota = 'per_row': must be one of global, per_tensor"),
    ({"dps.suppress": "middle"}, "dps.suppress = 'middle': must be one of top, random, bottom, random_global"),
    ({"dps.exclude": ["bias", ""]}, "dps.exclude = ['bias', '']: must be a list of non-empty name substrings"),
    ({"dps.exclude": 3}, "dps.exclude = 3: expected a list"),
    ({"optim.epochs": 0}, "optim.epochs = 0: must be >= 1"),
    ({"data.batch_size": 0}, "data.batch_size = 0: must be >= 1"),
    ({"algorithm": "sgd"}, "algorithm = 'sgd': must be one of ce, flyp, dps"),
    ({"model": "ViT-Z-99"}, "model = 'ViT-Z-99': not an open_clip architecture"),
    ({"data.dataset": "imagenet"}, "data.dataset = 'imagenet': must be one of synthetic, csv, iwildcam"),
    ({"data.eval_splits": ["id_val", "ood_train"]}, "data.eval_splits = 'ood_train': must be one of"),
    ({"data.dataset": "iwildcam", "data.root": "/nonexistent/wilds"}, "no iwildcam_v2.0/metadata.csv"),
    ({"data.dataset": "csv", "data.train_csv": "/nonexistent/train.csv", "data.classnames": "/nonexistent/c.txt"},
     "data.train_csv = '/nonexistent/train.csv': no such file"),
    ({"pretrained": "/nonexistent/weights.safetensors"}, "pretrained = '/nonexistent/weights.safetensors': no such file"),
    ({"pretrained": "laion9000"}, "pretrained = 'laion9000': must be none, a weights file"),
    ({"algorithm": "dps", "dps.reference": "/nonexistent/ref"}, "dps.reference = '/nonexistent/ref': no such file"),
    ({"algorithm": "dps"}, "algorithm dps needs exactly one of dps.reference"),
    ({"dps.reference_metric": "ood_test_f1"}, "dps.reference_metric = 'ood_test_f1': a test split never selects"),
    ({"data.dataset": "csv", "data.train_csv": "TRAIN", "data.classnames": "NAMES",
      "data.eval_csvs": {"id_val": "TRAIN"}, "data.eval_splits": ["id_val", "ood_test"]},
     "data.eval_splits = ['id_val', 'ood_test']: asks for 'ood_test' but data.eval_csvs names no CSV for it"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[m.split(":")[0][:40] for _, m in BAD])
def test_bad_config_is_one_line_error(overrides, message, write_yaml, capsys, tmp_path):
    (tmp_path / "train.csv").write_text("filepath\ttitle\tlabel\n")
    (tmp_path / "names.txt").write_text("a\nb\n")
    files = {"TRAIN": str(tmp_path / "train.csv"), "NAMES": str(tmp_path / "names.txt")}
    resolve = (lambda v: files.get(v, v) if isinstance(v, str) else
               {k: files.get(x, x) for k, x in v.items()} if isinstance(v, dict) else v)
    path = write_yaml(tiny_raw(**{k: resolve(v) for k, v in overrides.items()}))
    code = cli.main(["train", str(path), "--out", str(path.parent / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1, err
    assert err[0].startswith("dps-tune: error: ")
    assert message in err[0]
    assert not (path.parent / "out").exists(), "no work may start on a bad config"


@pytest.mark.parametrize("setting,message", [
    ("lr=-1", "optim.lr = -1.0: must be > 0"),
    ("optim.nonsense=1", "unknown key 'optim.nonsense'"),
    ("batch_size=0", "data.batch_size = 0: must be >= 1"),
    ("no_equals_sign", "expected key=value"),
])
def test_bad_set_override(setting, message, write_yaml, capsys):
    path = write_yaml(tiny_raw())
    code = cli.main(["train", str(path), "--set", setting])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_bad_yaml_and_missing_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("algorithm: [ce\n")
    assert cli.main(["train", str(bad)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert cli.main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_tune_block_is_validated(write_yaml):
    raw = tiny_raw()
    raw["tune"] = {"metric": "ood_val_loss"}
    with pytest.raises(ConfigError, match="tune.metric = 'ood_val_loss'"):
        load_file(write_yaml(raw))
    for test_metric in ("id_test_f1", "ood_test_acc"):
        raw["tune"] = {"metric": test_metric}
        with pytest.raises(ConfigError, match=f"tune.metric = '{test_metric}': a test split never selects"):
            load_file(write_yaml(raw))
    raw["tune"] = {"metric": "ood_val_f1"}
    assert load_file(write_yaml(raw)).tune.metric == "ood_val_f1"
    assert load_file(write_yaml(raw)).tune.loggers == ()  # no tracker unless asked for
    raw["tune"] = {"loggers": "mlflow"}
    assert load_file(write_yaml(raw)).tune.loggers == ("mlflow",)
    assert load_file(write_yaml(raw), ["tune.loggers=[wandb, mlflow]"]).tune.loggers == ("wandb", "mlflow")
    raw["tune"] = {"num_sample": 3}
    with pytest.raises(ConfigError, match="unknown key tune.num_sample"):
        load_file(write_yaml(raw))


def test_console_script_exit_status_and_no_traceback(write_yaml):
    path = write_yaml(tiny_raw(**{"optim.lr": -1}))
    proc = run_cli("train", path, check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "dps-tune: error: optim.lr = -1.0: must be > 0"


def test_defaults_are_the_paper_setup():
    cfg = Config()
    assert (cfg.model, cfg.pretrained, cfg.optim.lr, cfg.optim.wd, cfg.optim.epochs, cfg.data.batch_size) == (
        "ViT-B-16", "openai", 1e-5, 0.2, 20, 64)
    assert cfg.optim.warmup_steps == 500


def test_best_refuses_to_select_on_a_test_split(tmp_path, capsys):
    """Checked before the experiment is even read: no directory is needed to be refused."""
    assert cli.main(["best", str(tmp_path / "no-such-sweep"), "--metric", "ood_test_acc"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--metric = 'ood_test_acc': a test split never selects" in err[0], err


def test_train_refuses_a_bad_resume_path_before_any_work(write_yaml, tmp_path, capsys):
    path = write_yaml(tiny_raw())
    assert cli.main(["train", str(path), "--out", str(tmp_path / "out"), "--resume", str(tmp_path / "nope")]) == 2
    assert "--resume" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("tune,message", [
    ({"metric": ["id_val_f1", "ood_val_f1"], "mode": ["max"]}, "tune.mode = ['max']: must be a list of 2 modes"),
    ({"metric": ["id_val_f1", "ood_val_f1"], "mode": "max"}, "tune.mode = 'max': must be a list of 2 modes"),
    ({"metric": [], "mode": []}, "tune.metric = []: must name at least one metric"),
    ({"metric": ["id_val_f1", "id_val_f1"], "mode": ["max", "max"]}, "names a metric twice"),
    ({"metric": ["id_val_f1", "ood_test_f1"], "mode": ["max", "max"]}, "a test split never selects"),
    ({"metric": ["id_val_f1", "ood_val_f1"], "mode": ["max", "up"]}, "tune.mode = 'up'"),
    ({"metric": ["id_val_f1", "ood_val_f1"], "mode": ["max", "max"], "asha_metric": "val_loss"},
     "tune.asha_metric = 'val_loss'"),
    ({"metric": "id_val_f1", "asha_metric": "ood_val_f1"}, "is for a list of tune.metric only"),
    ({"resume_every_minutes": float("nan")}, "tune.resume_every_minutes = nan"),
    ({"resume_every": -1}, "tune.resume_every = -1"),
    ({"checkpoint_scheme": "all"}, "tune.checkpoint_scheme = 'all': must be one of economy, full"),
    ({"loggers": ["mlflow", "tensorboard"]}, "tune.loggers = 'tensorboard': must be one of mlflow, wandb"),
    ({"loggers": ["wandb", "wandb"]}, "tune.loggers = ['wandb', 'wandb']: names a logger twice"),
    ({"loggers": {"mlflow": True}}, "tune.loggers = {'mlflow': True}: expected a list"),
])
def test_bad_objectives_and_checkpoint_settings(tune, message, write_yaml):
    raw = tiny_raw()
    raw["tune"] = tune
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_file(write_yaml(raw))


def test_several_objectives_and_the_one_asha_uses(write_yaml):
    from dps_tune.objectives import objective_mean, objectives, scalar_objective

    raw = tiny_raw()
    raw["tune"] = {"metric": ["id_val_f1", "ood_val_f1"], "mode": ["max", "max"]}
    t = load_file(write_yaml(raw)).tune
    assert objectives(t) == (("id_val_f1", "ood_val_f1"), ("max", "max"))
    assert scalar_objective(t) == ("objective_mean", "max")
    assert objective_mean({"id_val_f1": 0.6, "ood_val_f1": 0.4}, t) == pytest.approx(0.5)
    raw["tune"]["asha_metric"] = "ood_val_f1"
    assert scalar_objective(load_file(write_yaml(raw)).tune) == ("ood_val_f1", "max")
    assert scalar_objective({"metric": "ood_val_acc"}) == ("ood_val_acc", "max")  # a sweep file's tune block
