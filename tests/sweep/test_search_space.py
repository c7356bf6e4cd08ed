import optuna.distributions as od
import pytest

from dps_tune.config import config_from_dict
from dps_tune.errors import ConfigError
from dps_tune.sweep.search_space import load_sweep, parse_search, to_optuna
from support.worlds import tiny_raw


@pytest.fixture
def base():
    return config_from_dict(tiny_raw())


def test_every_kind_to_optuna(base):
    space = parse_search({
        "lr": {"loguniform": ["1e-6", 1.0e-4]},
        "optim.wd": {"uniform": [0.0, 0.3]},
        "masking": {"quniform": [0.1, 0.9, 0.1]},
        "warmup_steps": {"randint": [0, 10]},
        "dps.suppress": {"choice": ["top", "random"]},
    }, base)
    assert space.keys == ["optim.lr", "optim.wd", "dps.masking", "optim.warmup_steps", "dps.suppress"]
    dists = to_optuna(space)
    assert dists["optim.lr"] == od.FloatDistribution(1e-6, 1e-4, log=True)
    assert dists["optim.warmup_steps"] == od.IntDistribution(0, 9)  # randint's high is exclusive
    assert dists["dps.masking"].step == pytest.approx(0.1) and dists["dps.masking"].high == pytest.approx(0.9)
    assert dists["dps.suppress"].choices == ("top", "random")
    variants = to_optuna(parse_search({"quota": {"choice": ["global", "per_tensor"]},
                                       "exclude": {"choice": ["bias,positional_embedding,ln",
                                                              "bias,positional_embedding,ln,token_embedding"]}}, base))
    assert variants["dps.quota"].choices == ("global", "per_tensor") and len(variants["dps.exclude"].choices) == 2


@pytest.mark.parametrize("spec,message", [
    ({"nonsense": {"uniform": [0, 1]}}, "search: unknown key 'nonsense'"),
    ({"lr": {"gaussian": [0, 1]}}, "unknown distribution 'gaussian'"),
    ({"lr": {"loguniform": [0, 1e-4]}}, "loguniform needs low > 0"),
    ({"lr": {"uniform": [1e-3, 1e-4]}}, "low must be below high"),
    ({"lr": {"uniform": [1e-4]}}, "uniform takes [low, high]"),
    ({"lr": [1e-4, 1e-3]}, "expected one distribution"),
    ({"masking": {"uniform": [0.1, 1.5]}}, "search.dps.masking can produce 1.5, which is invalid: dps.masking = 1.5"),
    ({"quota": {"choice": ["global", "per_row"]}}, "dps.quota = 'per_row'"),
    ({"exclude": {"choice": ["bias,ln", "bias,,ln"]}}, "dps.exclude = ['bias', '', 'ln']"),
    ({"wd": {"uniform": [-0.1, 0.2]}}, "optim.wd = -0.1: must be >= 0"),
    ({"suppress": {"choice": ["top", "middle"]}}, "dps.suppress = 'middle'"),
    ({"suppress": {"choice": []}}, "choice takes a non-empty list"),
    ({"epochs": {"randint": [1.5, 3]}}, "is not an integer"),
    ({"batch_size": {"uniform": [8, 16]}}, "data.batch_size = 8.0: expected an integer"),
])
def test_bad_search_blocks(spec, message, base):
    with pytest.raises(ConfigError) as err:
        parse_search(spec, base)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_load_sweep_with_tune_block_and_overrides(write_yaml):
    raw = tiny_raw()
    raw["search"] = {"lr": {"loguniform": [1e-5, 1e-3]}}
    raw["tune"] = {"metric": "ood_val_f1", "num_samples": 3}
    sweep = load_sweep(write_yaml(raw), ["tune.num_samples=5", "epochs=3"])
    assert sweep.tune.num_samples == 5 and sweep.tune.metric == "ood_val_f1"
    assert sweep.config.optim.epochs == 3 and sweep.max_t == 3


def test_searched_epochs_need_max_t(write_yaml):
    raw = tiny_raw()
    raw["search"] = {"epochs": {"randint": [1, 4]}}
    with pytest.raises(ConfigError, match="set tune.max_t"):
        load_sweep(write_yaml(raw))


@pytest.mark.parametrize("name", ["iwildcam_ce", "iwildcam_flyp", "iwildcam_dps"])
def test_shipped_iwildcam_spaces_validate(name, tmp_path):
    from pathlib import Path

    from support.datasets import make_iwildcam

    make_iwildcam(tmp_path)
    (tmp_path / "ce_sweep").mkdir()
    root = Path(__file__).resolve().parents[2] / "search_spaces"
    sweep = load_sweep(root / f"{name}.yaml", [f"data.root={tmp_path}", f"dps.reference_experiment={tmp_path / 'ce_sweep'}"])
    assert sweep.config.model == "ViT-B-16" and sweep.config.pretrained == "openai"
    assert sweep.tune.metric == "id_val_f1" and sweep.max_t == 20
    assert {"optim.lr", "optim.wd"} <= set(sweep.space.keys)
    if name == "iwildcam_dps":
        assert dict(sweep.space.params)["dps.masking"].args == (0.1, 0.9)
    assert "ood_val_f1" in (root / f"{name}.yaml").read_text()  # says how to select on OOD instead


def test_multi_node_local_storage_fails_fast(monkeypatch):
    import ray

    from dps_tune.config import TuneConfig
    from dps_tune.errors import LaunchError
    from dps_tune.sweep.ray_tune import launch as tuning

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 64.0, "GPU": 8.0})
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}, {"Alive": True}])
    with pytest.raises(LaunchError, match="a local path, but the cluster has 2 nodes"):
        tuning._check_resources(TuneConfig(gpus_per_trial=1), "/home/me/runs", shared_storage=False)
    tuning._check_resources(TuneConfig(gpus_per_trial=1), "s3://bucket/runs", shared_storage=False)
    tuning._check_resources(TuneConfig(gpus_per_trial=1), "/nfs/runs", shared_storage=True)
    with pytest.raises(LaunchError, match="gpus_per_trial = 9: the cluster has 8 GPU"):
        tuning._check_resources(TuneConfig(gpus_per_trial=9), "s3://bucket/runs", shared_storage=False)
