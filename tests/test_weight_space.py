"""WiSE-FT and soups on the tiny model: exact ends, exact one-ingredient soups, a greedy soup that never loses."""

import shutil

import pytest
import torch

from dps_tune import checkpoint, weight_space
from dps_tune.errors import UserError
from dps_tune.train import evaluate_start, run_trial


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny CE trial: its config and its last checkpoint (weights and recorded metrics)."""
    from dps_tune.config import config_from_dict
    from support.worlds import tiny_raw

    cfg = config_from_dict(tiny_raw(**{"optim.epochs": 2, "optim.lr": 3e-3}))
    out = tmp_path_factory.mktemp("trial")
    kept = []

    def report(metrics, path):
        if path is not None:
            kept.append(shutil.copytree(path, out / path.name))

    run_trial(cfg, report)
    return cfg, checkpoint.load_checkpoint(kept[-1], with_state=False)


def test_alpha_zero_is_zero_shot_and_alpha_one_reproduces_the_recorded_metrics(trained):
    cfg, ck = trained
    ev = weight_space.Evaluator(cfg)
    for alpha, end in ((0.0, ev.theta0), (1.0, ck.model_state)):  # the ends are the weights, bit for bit
        state = weight_space.interpolate(ev.theta0, ck.model_state, alpha)
        assert state.keys() == end.keys() and all(torch.equal(state[k], end[k]) for k in end)
    at0 = ev(weight_space.interpolate(ev.theta0, ck.model_state, 0.0))
    assert at0 == evaluate_start(cfg)
    at1 = ev(weight_space.interpolate(ev.theta0, ck.model_state, 1.0))
    assert at1 == {k: v for k, v in ck.metrics.items() if k in at1}
    half = weight_space.interpolate(ev.theta0, ck.model_state, 0.5)
    name = next(k for k, v in half.items() if v.is_floating_point() and not torch.equal(ev.theta0[k], ck.model_state[k]))
    assert torch.allclose(half[name], (ev.theta0[name] + ck.model_state[name]) / 2)


def test_a_soup_of_one_is_that_ingredient_and_averages_are_means(trained):
    _, ck = trained
    one = weight_space.average([ck.model_state])
    assert all(torch.equal(one[k], ck.model_state[k]) for k in ck.model_state)
    doubled = {k: v * 3 if v.is_floating_point() else v for k, v in ck.model_state.items()}
    mean = weight_space.average([ck.model_state, doubled])
    k = next(k for k, v in ck.model_state.items() if v.is_floating_point() and v.abs().sum() > 0)
    assert torch.allclose(mean[k], ck.model_state[k] * 2)


def test_greedy_soup_never_falls_below_its_best_ingredient():
    values = {"a": 0.70, "b": 0.65, "c": 0.60, "d": 0.50}
    soup_value = {("a", "b"): 0.72, ("a", "b", "c"): 0.71, ("a", "b", "d"): 0.74}
    # any other soup (one the greedy recipe never tries) is worse than every ingredient alone
    soup, steps = weight_space.greedy_soup(list(values.items()), lambda names: soup_value.get(tuple(names), 0.3))
    assert soup == ["a", "b", "d"]
    assert [s.accepted for s in steps] == [True, True, False, True]
    assert max(s.value for s in steps if s.accepted) >= values["a"]
    # nothing helps: the soup is the best ingredient alone
    soup, steps = weight_space.greedy_soup(list(values.items()), lambda names: 0.1)
    assert soup == ["a"] and steps[0].value == 0.70


def test_mismatches_and_bad_alphas_are_refused(trained):
    _, ck = trained
    other = dict(ck.model_state)
    name = next(iter(other))
    other[name] = torch.zeros(3, 3)
    with pytest.raises(UserError, match=f"tensor '{name}'"):
        weight_space.check_compatible(ck.model_state, other, "a", "b")
    with pytest.raises(UserError, match="different architecture"):
        weight_space.check_compatible(ck.model_state, {"x": torch.zeros(1)}, "a", "b")
    for alpha in (-0.1, 1.5, float("nan")):
        with pytest.raises(UserError, match="must be in"):
            weight_space.interpolate(ck.model_state, ck.model_state, alpha)


@pytest.mark.parametrize("text,expected", [("0:1:0.25", [0, 0.25, 0.5, 0.75, 1.0]), ("0:1:0.1", None),
                                           ("1,0,0.5", [0, 0.5, 1.0])])
def test_alpha_grids(text, expected):
    from dps_tune.sweep.candidates import parse_alphas

    got = parse_alphas(text)
    if expected is None:
        assert len(got) == 11 and got[0] == 0 and got[-1] == 1.0 and got[3] == 0.3
    else:
        assert got == expected


@pytest.mark.parametrize("text,message", [("0:1.5:0.5", "outside [0, 1]"), ("", "empty grid"),
                                          ("1:0:0.1", "start <= stop"), ("a,b", "START:STOP:STEP"),
                                          ("-0.1,0.5", "outside [0, 1]")])
def test_bad_alpha_grids(text, message):
    from dps_tune.sweep.candidates import parse_alphas

    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_alphas(text)
