"""The benchmark commands on the CPU: each runs, prints its line, and the numbers parse."""

import logging
import re

import pytest
import torch

from dps_tune.bench import __main__ as bench_cli
from dps_tune.bench import rank, step
from dps_tune.train import Runtime

RANK_LINE = re.compile(r"^rank: one-pass ([0-9.e+-]+) s, per-row loop ([0-9.e+-]+) s, speedup ([0-9]+)×$")
STEP_LINE = re.compile(
    r"^step: (?P<label>paper-code|fast) (?P<algorithm>ce|flyp|dps) tiny-vit batch (?P<batch>\d+) fp32 (?P<adamw>adamw-foreach|adamw-fused) "
    r"(?P<compiled>eager|eager\(compile-failed\)) on cpu: (?P<img_s>[0-9.]+) img/s, (?P<ms>[0-9.]+) ms/step, peak mem n/a, [0-9.e+-]+ TFLOP/step, "
    r"bf16 peak n/a, (?:dps overhead vs ce (?P<overhead>[0-9.]+)× \([+-][0-9.]+%\), )?"
    r"speedup vs baseline (?P<speedup>[0-9.]+)×$")


@pytest.fixture(autouse=True)
def _restore_threads():
    """The benchmarks pin the CPU thread count; give the other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().out.splitlines() if line.strip()]


def test_rank_one_pass_is_over_100x_faster_with_identical_orderings(capsys, caplog):
    caplog.set_level(logging.INFO, logger="dps_tune")
    assert bench_cli.main(["rank", "--repeats", "3"]) == 0
    lines = _lines(capsys)
    assert len(lines) == 1, lines
    m = RANK_LINE.match(lines[0])
    assert m, lines[0]
    one_pass, loop, speedup = float(m[1]), float(m[2]), int(m[3])
    assert 0 < one_pass < loop
    assert speedup > 100
    assert "scores, global order and the masking-0.90 suppressed set are identical" in caplog.text


def _tie_pair():
    """Rows with exact ties inside and across tensors, a tensor CE never moved, excluded names."""
    g = torch.Generator().manual_seed(0)
    theta0 = {
        "visual.conv1.weight": torch.randn(6, 3, 2, 2, generator=g),
        "visual.ln_pre.weight": torch.randn(6, 4, generator=g),
        "transformer.resblocks.0.attn.in_proj_bias": torch.randn(9, 3, generator=g),
        "positional_embedding": torch.randn(5, 4, generator=g),
        "token_embedding.weight": torch.randn(12, 4, generator=g),
        "frozen.weight": torch.randn(4, 4, generator=g),
    }
    theta1 = rank.fine_tune_stand_in(theta0, seed=3, scale=0.1)
    theta1["frozen.weight"] = theta0["frozen.weight"].clone()
    for row in (3, 7):  # Δ of exactly 1.0 in both rows: a tie at the top of the tensor
        theta0["token_embedding.weight"][row] = 0.0
        theta1["token_embedding.weight"][row] = 1.0
    return theta0, theta1


def test_per_row_loop_matches_one_pass_ranking_and_detects_a_difference():
    theta0, theta1 = _tie_pair()
    entries = rank.per_row_loop(theta0, theta1)
    assert [n for n in dict.fromkeys(n for _, n, _ in entries)] == [
        "visual.conv1.weight", "token_embedding.weight", "frozen.weight"]
    assert all(s == 0.0 for s, n, _ in entries if n == "frozen.weight")
    order_loop = rank.loop_order(entries)
    # the two tied rows keep their (tensor, row) order
    tied = [entries[i][2] for i in order_loop if entries[i][1] == "token_embedding.weight"][:2]
    assert tied == [3, 7]
    scores, order = rank.one_pass_order(theta0, theta1)
    assert rank.compare(scores, order, entries, order_loop, 0.5) == []
    swapped = list(order_loop)
    swapped[0], swapped[1] = swapped[1], swapped[0]
    assert any("orders differ" in p for p in rank.compare(scores, order, entries, swapped, 0.5))


def _run_step(capsys, algorithm: str, *extra: str) -> list[re.Match]:
    argv = ["step", "--algorithm", algorithm, "--baseline", "--batch", "16", "--baseline-batch", "8",
            "--steps", "2", "--warmup", "1", "--rounds", "2", "--device", "cpu", *extra]
    assert bench_cli.main(argv) == 0
    lines = _lines(capsys)
    matches = [STEP_LINE.match(line) for line in lines]
    assert all(matches), lines
    return matches


@pytest.mark.parametrize("algorithm", ["ce", "flyp", "dps"])
def test_step_prints_one_line_per_configuration_with_the_speedup(capsys, algorithm):
    matches = _run_step(capsys, algorithm)
    expected = [("paper-code", algorithm, "8")] + ([("fast", "ce", "16")] if algorithm == "dps" else []) + [
        ("fast", algorithm, "16")]
    assert [(m["label"], m["algorithm"], m["batch"]) for m in matches] == expected
    # the paper's code steps an unfused AdamW; a trial, on the CPU too, the fused one
    assert [m["adamw"] for m in matches] == ["adamw-foreach"] + ["adamw-fused"] * (len(matches) - 1)
    assert matches[0]["speedup"] == "1.00"
    for m in matches:
        assert float(m["img_s"]) > 0 and float(m["speedup"]) > 0
        assert (m["overhead"] is not None) == (m["label"] == "fast" and m["algorithm"] == "dps")
    if algorithm == "dps":
        assert 0.2 < float(matches[-1]["overhead"]) < 5


def test_step_says_when_compiling_fell_back_to_eager(capsys, caplog, monkeypatch):
    def broken_compile(fn, *args, **kwargs):
        def run(*a, **k):
            raise RuntimeError("no compiler here")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    matches = _run_step(capsys, "ce", "--compile")
    assert [m["compiled"] for m in matches] == ["eager", "eager(compile-failed)"]
    assert "torch.compile failed (RuntimeError: no compiler here); running eagerly" in caplog.text


def test_step_line_reports_gpu_figures_when_they_exist():
    def fake(label, algorithm, batch, seconds):
        rt = Runtime(torch.device("cpu"), bf16=label == "fast", compile=label == "fast", fused_adamw=label == "fast",
                     pin_memory=False)
        s = step.StepSetup(label, algorithm, "ViT-B-16", batch, rt, torch.nn.Linear(1, 1), None, None, None, None)
        s.step_s, s.peak_bytes, s.flops = [seconds], 3 * 2**30, 19e12
        return s

    base = fake("paper-code", "ce", 64, 0.25)
    ce = fake("fast", "ce", 256, 0.1)
    dps = fake("fast", "dps", 256, 0.102)
    line = step.format_line(dps, 989e12, base, ce)
    assert line == ("step: fast dps ViT-B-16 batch 256 bf16 adamw-fused compiled on cpu: 2509.8 img/s, 102.0 ms/step, "
                    "peak mem 3.00 GiB, 19 TFLOP/step, 18.8% of bf16 peak, dps overhead vs ce 1.020× (+2.0%), "
                    "speedup vs baseline 9.80×")
    assert step.format_line(ce, None, None, None).endswith("bf16 peak n/a, speedup vs baseline n/a")
    assert step.bf16_peak_flops(torch.device("cpu")) is None


def test_bench_eval_counts_a_worked_asha_example():
    from dps_tune.bench import eval as bench_eval

    trials = bench_eval.asha_trials(num_samples=9, epochs=9, grace=1, eta=3, keep=2)
    # rungs at 1 and 3 epochs: 6 trials stop at 1, 2 at 3, one trains all 9
    assert sorted(t.reports for t in trials) == [1] * 6 + [3] * 2 + [9]
    assert [t.finished for t in trials].count(True) == 1
    before, after = bench_eval.images(trials, {"id_val": 10, "id_test": 20, "ood_test": 10})
    assert before == 21 * 40
    assert after == 21 * 10 + (6 * 1 + 3 * 2) * 30


def test_bench_eval_prints_the_demo_and_iwildcam_ratios(capsys):
    from dps_tune.bench import eval as bench_eval

    assert bench_eval.main([]) == 0
    out = capsys.readouterr().out
    for space in ("demo demo.yaml", "demo demo_dps.yaml", "iwildcam iwildcam_ce.yaml"):
        assert space in out
    totals = [line for line in out.splitlines() if line.startswith("eval: ")]
    assert len(totals) == 2 and all("x fewer" in line for line in totals)
    assert "id_val 7,314, id_test 8,154, ood_val 14,961, ood_test 42,791" in out
