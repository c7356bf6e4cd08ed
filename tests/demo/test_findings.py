"""findings.md: every sentence is chosen by its interval, never written by hand."""

import re

from dps_tune.demo.findings import Comparison, render, sentence, sentences


def test_a_sentence_says_only_what_the_interval_supports():
    above = Comparison("ce", "zero-shot", "ood_test_acc", 0.14, 0.10, 0.18)
    below = Comparison("dps (top)", "zero-shot", "ood_test_acc", -0.05, -0.08, -0.02)
    unsure = Comparison("flyp", "ce", "ood_test_acc", 0.01, -0.02, 0.04)
    assert sentence([above]) == "ce beats zero-shot on OOD test accuracy: +0.140 [+0.100, +0.180]."
    assert sentence([below]) == "dps (top) is below zero-shot on OOD test accuracy: -0.050 [-0.080, -0.020]."
    assert sentence([unsure]).startswith("The data cannot tell flyp from ce on OOD test accuracy: +0.010 [-0.020")


def test_two_metrics_that_agree_are_one_sentence_and_disagreeing_ones_two():
    id_up = Comparison("ce", "zero-shot", "id_test_acc", 0.3, 0.25, 0.35, note="3 seeds")
    ood_up = Comparison("ce", "zero-shot", "ood_test_acc", 0.2, 0.15, 0.25, note="3 seeds")
    ood_none = Comparison("ce", "zero-shot", "ood_test_acc", 0.0, -0.01, 0.01, note="3 seeds")
    assert sentences([id_up, ood_up]) == [
        "ce beats zero-shot on ID test accuracy and OOD test accuracy: ID +0.300 [+0.250, +0.350], "
        "OOD +0.200 [+0.150, +0.250] (3 seeds)."]
    [mixed] = sentences([id_up, ood_none])
    assert mixed.startswith("ce beats zero-shot on ID test accuracy") and "cannot tell" in mixed


def test_the_page_lists_each_section_and_skips_empty_ones():
    page = render("What the demo found", ["world: wild"], [("Against zero-shot", ["a.", "b."]), ("Empty", [])])
    assert page == "# What the demo found\n\nworld: wild\n\n## Against zero-shot\n\n- a.\n- b.\n"


def test_the_frontier_sentence_says_whether_ce_s_curve_was_resampled_too(tmp_path, monkeypatch):
    import numpy as np

    from dps_tune.demo import study
    from dps_tune.sweep import confirm
    from support.experiments import write_wise_output

    rng = np.random.default_rng(6)
    n = 300
    correct = {a: ((rng.random(n) < p_id).astype(float), (rng.random(n) < p_ood).astype(float))
               for a, p_id, p_ood in ((0.0, 0.5, 0.45), (0.5, 0.7, 0.5), (1.0, 0.9, 0.3))}
    # DPS's confirmed seeds are, image for image, CE's alpha 0.5: on the curve in every paired resample
    seeds = {s: {"id_test_acc": (np.zeros(n), correct[0.5][0]), "ood_test_acc": (np.zeros(n), correct[0.5][1])}
             for s in study.CONFIRM_SEEDS}
    monkeypatch.setattr(confirm, "finished_seeds", lambda exp: ({}, {"dps (top)": seeds}))
    summary = {"pairs": [], "methods": {"dps (top)": {"id_test_acc": {"mean": float(correct[0.5][0].mean())},
                                                      "ood_test_acc": {"mean": float(correct[0.5][1].mean())}}}}
    for name, with_predictions, says in (("new", True, "CE's curve recomputed on the same images"),
                                         ("old", False, "CE's curve held fixed: its wise output has no per-image")):
        wise = write_wise_output(tmp_path / name / "wise", correct, with_predictions=with_predictions)
        page = study.write_findings(tmp_path / name, [], tmp_path / "confirm", summary, wise).read_text()
        [line] = [ln for ln in page.splitlines() if "CE's WiSE-FT curve on OOD" in ln]
        assert "## Along CE's WiSE-FT curve" not in page  # no confirmed CE seeds to mix
        low, high = map(float, re.search(r"\[([-+][\d.]+), ([-+][\d.]+)\]", line).groups())
        assert says in line, line
        if with_predictions:  # no width: the method and the curve move together
            assert high - low < 1e-3, line
        else:  # the method's own test-set noise against a fixed curve
            assert high - low > 0.05, line


def test_ce_s_wise_ft_mix_is_set_against_both_ends_of_its_curve():
    import numpy as np

    from dps_tune.demo import study
    from dps_tune.demo.findings import sentences

    def hits(lo: int, hi: int) -> np.ndarray:  # [1, 1,000]: correct on images lo..hi-1
        c = np.zeros((1, 1000))
        c[0, lo:hi] = 1.0
        return c

    zero_shot, ce = hits(0, 500), hits(400, 900)
    # Paired on the images: against zero-shot the mix wins 450 and loses 300 (a standard error of
    # sqrt((0.75 - 0.15²) / 1000) = 0.027), against CE it wins 150 and loses none (0.011).
    note = "(1 seed and the test images resampled, outside the Holm family)."
    assert sentences(study.wise_mix_comparisons((hits(300, 950), ce, zero_shot))) == [
        f"CE's WiSE-FT mix α = 0.5 beats its α = 0 (zero-shot) on OOD test accuracy: +0.150 [+0.096, +0.202] {note}",
        f"CE's WiSE-FT mix α = 0.5 beats its α = 1 (CE) on OOD test accuracy: +0.150 [+0.129, +0.172] {note}",
    ]
    # two seeds that trade OOD away, against a zero-shot row compared with each seed
    trading = (np.concatenate([hits(0, 500), hits(0, 500)]), np.concatenate([hits(0, 500), hits(0, 480)]),
               hits(0, 600))
    first, second = sentences(study.wise_mix_comparisons(trading))
    assert first.startswith("CE's WiSE-FT mix α = 0.5 is below its α = 0 (zero-shot) on OOD test accuracy: -0.100")
    assert "(2 seeds and the test images resampled" in first
    assert second.startswith("The data cannot tell CE's WiSE-FT mix α = 0.5 from its α = 1 (CE)")
    assert study.wise_mix_comparisons(None) == []  # no confirmed CE seed
