import logging
import math

import pytest
import torch
from safetensors.torch import save_file

from dps_tune import cli, models, suppression
from dps_tune.checkpoint import load_checkpoint
from dps_tune.errors import CheckpointError
from dps_tune.methods import Batch, CEObjective
from dps_tune.sweep import reference
from dps_tune.train import run_trial
from support.worlds import tiny_raw


def brute_force_scores(theta0, theta1):
    """The published algorithm, row by row: re-normalise the whole tensor for every row."""
    out = {}
    for name, a in theta0.items():
        if a.dim() < 2 or any(s in name for s in ("bias", "positional_embedding", "ln")):
            continue
        delta = (a - theta1[name]).abs()
        rows = []
        for c in range(a.shape[0]):
            norm = torch.linalg.vector_norm(delta)
            rows.append(0.0 if norm.item() == 0 else (delta[c].max() / norm).item())
        out[name] = torch.tensor(rows)
    return out


def random_pair(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "visual.conv1.weight": (8, 3, 4, 4),  # 4-D conv weight
        "visual.transformer.resblocks.0.attn.in_proj_weight": (12, 4),
        "visual.transformer.resblocks.0.attn.in_proj_bias": (12,),  # excluded: bias, 1-D
        "visual.ln_pre.weight": (4,),  # excluded: 1-D
        "visual.ln_post.weight2d": (3, 4),  # excluded: name contains ln
        "positional_embedding": (5, 4),  # excluded by name
        "token_embedding.weight": (20, 4),
        "text_projection": (4, 4),
        "frozen.weight": (6, 4),  # Δ ≡ 0
        "logit_scale": (),
    }
    theta0 = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    theta1 = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in theta0.items()}
    theta1["frozen.weight"] = theta0["frozen.weight"].clone()
    # some exact ties across tensors, to pin down the global order
    theta1["text_projection"][0] = theta0["text_projection"][0] + 0.5
    return theta0, theta1


@pytest.mark.parametrize("seed", range(3))
def test_scores_equal_the_per_row_loop(seed):
    theta0, theta1 = random_pair(seed)
    fast = suppression.rank_scores(theta0, theta1)
    slow = brute_force_scores(theta0, theta1)
    assert list(fast) == list(slow)
    assert set(fast) == {"visual.conv1.weight", "visual.transformer.resblocks.0.attn.in_proj_weight",
                         "token_embedding.weight", "text_projection", "frozen.weight"}
    for name in fast:
        assert torch.equal(fast[name], slow[name]), name
    assert torch.equal(fast["frozen.weight"], torch.zeros(6))  # not NaN


def test_prefixed_names_are_matched():
    theta0, theta1 = random_pair()
    wrapped = {f"module._orig_mod.{k}": v for k, v in theta1.items()}
    a = suppression.rank_scores(theta0, theta1)
    b = suppression.rank_scores({f"module.{k}": v for k, v in theta0.items()}, wrapped)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_mismatched_reference_is_refused():
    theta0, theta1 = random_pair()
    theta1["token_embedding.weight"] = torch.zeros(21, 4)
    with pytest.raises(CheckpointError, match="token_embedding.weight.*shape"):
        suppression.rank_scores(theta0, theta1)
    del theta1["token_embedding.weight"]
    with pytest.raises(CheckpointError, match="missing"):
        suppression.rank_scores(theta0, theta1)


def test_masking_counts_and_modes():
    theta0, theta1 = random_pair()
    scores = suppression.rank_scores(theta0, theta1)
    n = sum(s.numel() for s in scores.values())  # 8 + 12 + 20 + 4 + 6 = 50
    assert n == 50
    for masking in (0.0, 0.29, 0.5, 0.9, 1.0):
        k = math.floor(round(masking * 100) * n / 100)
        for mode in suppression.SUPPRESS_MODES:
            masks = suppression.select_rows(scores, masking, mode, seed=1)
            assert sum(int(m.sum()) for m in masks.values()) == k, (masking, mode)
    flat = torch.cat(list(scores.values()))
    top = torch.cat(list(suppression.select_rows(scores, 0.5, "top").values()))
    assert flat[top].min() >= flat[~top].max()
    for name, held in suppression.select_rows(scores, 0.5, "bottom").items():  # the tensor's least-moved rows
        if held.any() and (~held).any():
            assert scores[name][held].max() <= scores[name][~held].min(), name
    for mode in ("random", "random_global"):
        r1 = suppression.select_rows(scores, 0.5, mode, seed=7)
        r2 = suppression.select_rows(scores, 0.5, mode, seed=7)
        r3 = suppression.select_rows(scores, 0.5, mode, seed=8)
        assert all(torch.equal(r1[k], r2[k]) for k in r1)
        assert any(not torch.equal(r1[k], r3[k]) for k in r1)


@pytest.mark.parametrize("quota", ["global", "per_tensor"])
@pytest.mark.parametrize("masking", [0.1, 0.5, 0.9])
def test_controls_hold_as_many_rows_as_top_in_every_tensor(quota, masking):
    """The matched controls differ from top only in which rows: per-tensor counts are equal."""
    theta0, theta1 = random_pair(3)
    scores = suppression.rank_scores(theta0, theta1)
    top = suppression.select_rows(scores, masking, "top", quota=quota)
    counts = {name: int(m.sum()) for name, m in top.items()}
    assert len(set(counts.values())) > 1  # the tensors differ, so equal counts are not a coincidence
    for mode in ("random", "bottom"):
        for seed in (0, 1):
            other = suppression.select_rows(scores, masking, mode, seed=seed, quota=quota)
            assert {name: int(m.sum()) for name, m in other.items()} == counts, (mode, seed)
            assert any(not torch.equal(top[n], other[n]) for n in top), mode  # different rows
    # The unmatched draw keeps only the total: at a global 50% cut it misses some tensor's count.
    loose = suppression.select_rows(scores, 0.5, "random_global", seed=0)
    top50 = suppression.select_rows(scores, 0.5, "top")
    assert sum(int(m.sum()) for m in loose.values()) == sum(int(m.sum()) for m in top50.values())
    assert any(int(loose[n].sum()) != int(top50[n].sum()) for n in top50)


def test_per_tensor_quota_cuts_every_tensor_at_the_same_fraction():
    theta0, theta1 = random_pair(4)
    scores = suppression.rank_scores(theta0, theta1)
    masks = suppression.select_rows(scores, 0.5, "top", quota="per_tensor")
    for name, held in masks.items():
        assert int(held.sum()) == math.floor(0.5 * held.numel()), name
        assert scores[name][held].min() >= scores[name][~held].max(), name
    assert int(masks["token_embedding.weight"].sum()) == 10
    # the global cut of the same pair puts a different share in some tensor
    glob = suppression.select_rows(scores, 0.5, "top")
    assert any(int(glob[n].sum()) != int(masks[n].sum()) for n in masks)


def test_exclude_patterns_leave_tensors_out_of_the_ranking():
    theta0, theta1 = random_pair()
    every = suppression.rank_scores(theta0, theta1, exclude=())  # what the cache holds
    assert "positional_embedding" in every and "visual.ln_post.weight2d" in every
    paper = suppression.select_rows(every, 0.5, "top")
    assert set(paper) == set(suppression.rank_scores(theta0, theta1))  # the paper's set by default
    no_tokens = suppression.select_rows(every, 0.5, "top",
                                        exclude=("bias", "positional_embedding", "ln", "token_embedding"))
    assert set(no_tokens) == set(paper) - {"token_embedding.weight"}
    assert sum(int(m.sum()) for m in no_tokens.values()) == math.floor(0.5 * 30)


def test_floor_uses_the_written_decimal():
    assert suppression.suppressed_count(0.29, 100) == 29  # float arithmetic says 28
    assert suppression.suppressed_count(0.9, 189_696) == 170_726


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "foreach"])
def test_suppressed_rows_hold_bit_for_bit_under_adamw(fused):
    """Under the fused AdamW every run uses, and under the foreach one."""
    from dps_tune.optim import build_optimizer

    torch.manual_seed(0)
    model = models.create_model("tiny-vit", "none")
    theta0 = models.plain_state_dict(model)
    g = torch.Generator().manual_seed(5)
    theta1 = {k: v + torch.rand(v.shape[:1] + (1,) * (v.dim() - 1), generator=g) * torch.randn(v.shape, generator=g)
              for k, v in theta0.items() if v.dim() >= 1}
    scores = suppression.rank_scores(theta0, theta1)
    masks = suppression.select_rows(scores, 0.5, "top")
    sup = suppression.RowSuppressor(model, masks)
    opt = build_optimizer(model, lr=1e-3, wd=0.2, betas=(0.9, 0.999), eps=1e-8, fused=fused)
    assert opt.defaults["fused" if fused else "foreach"] is True
    sup.attach(opt)
    tok = models.get_tokenizer("tiny-vit")
    prompts = torch.stack([tok([f"a photo of a {c}." for c in ("cat", "dog", "owl")])])
    objective = CEObjective(prompts, seed=0)
    batch = Batch(torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2]))
    for _ in range(20):
        opt.zero_grad()
        objective.loss(model, batch)["loss"].backward()
        opt.step()
    after = models.plain_state_dict(model)
    for name, mask in masks.items():
        held = after[name][mask]
        assert torch.equal(held, theta0[name][mask]), name  # bit for bit, despite weight decay
        moved = (after[name][~mask] != theta0[name][~mask]).flatten(1).any(1)
        assert bool(moved.all()), f"{name}: {int((~moved).sum())} unsuppressed rows did not train"
    # parameters outside the ranked set train normally
    assert not torch.equal(after["visual.ln_pre.weight"], theta0["visual.ln_pre.weight"])
    assert sup.num_suppressed == math.floor(0.5 * sup.num_ranked)


def test_ranking_cache_hit(tmp_path, caplog):
    theta0, theta1 = random_pair()
    with caplog.at_level(logging.INFO, logger="dps_tune.suppression"):
        a, hit1 = suppression.cached_ranking(theta0, theta1, tmp_path)
        b, hit2 = suppression.cached_ranking(theta0, theta1, tmp_path)
    assert (hit1, hit2) == (False, True)
    assert "ranking cache miss" in caplog.text and "ranking cache hit" in caplog.text
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(list(tmp_path.glob("*.pt"))) == 1
    # a different pretrained model is a different key, with the same reference...
    theta0_other = {k: v.clone() for k, v in theta0.items()}
    theta0_other["text_projection"] += 1
    other, hit3 = suppression.cached_ranking(theta0_other, theta1, tmp_path)
    assert not hit3 and not all(torch.equal(a[k], other[k]) for k in a)
    # ...and so is a different reference, with the same pretrained model
    theta1["text_projection"] += 1
    _, hit4 = suppression.cached_ranking(theta0, theta1, tmp_path)
    assert not hit4
    assert len(list(tmp_path.glob("*.pt"))) == 3
    # The cache scores every tensor any dps.exclude could rank, so a change there is a new key too.
    theta1["positional_embedding"] += 1
    assert "positional_embedding" in a
    _, hit5 = suppression.cached_ranking(theta0, theta1, tmp_path)
    assert not hit5


def _pretrained_file(tmp_path):
    torch.manual_seed(123)
    path = tmp_path / "pretrained.safetensors"
    save_file(models.plain_state_dict(models.create_model("tiny-vit", "none")), str(path))
    return path


def test_masking_zero_is_ce(tiny_config, tmp_path):
    pre = _pretrained_file(tmp_path)
    ref = tmp_path / "ref.safetensors"
    save_file({k: v + 1 for k, v in models.load_weights_file(pre).items()}, str(ref))
    out = {}
    for algo in ("ce", "dps"):
        cfg = tiny_config(algorithm=algo, pretrained=str(pre), **{"dps.reference": str(ref), "dps.masking": 0.0,
                                                                     "dps.ranking_cache": str(tmp_path / "rc")})
        resolved = reference.resolve(cfg)
        out[algo] = run_trial(resolved.config, ranking=resolved.ranking)
    for key in out["ce"]:
        if key != "samples_per_s":
            assert out["ce"][key] == out["dps"][key], key


def test_dps_train_holds_exactly_the_top_rows(tmp_path, write_yaml, capsys):
    """CE reference run, then DPS: the saved model equals θ0 on exactly the top-ranked rows."""
    pre = _pretrained_file(tmp_path)
    raw = tiny_raw(pretrained=str(pre), **{"optim.epochs": 2, "dps.ranking_cache": str(tmp_path / "rc")})
    path = write_yaml(raw)
    assert cli.main(["train", str(path), "--out", str(tmp_path / "ce"), "--no-progress"]) == 0
    assert cli.main(["train", str(path), "--out", str(tmp_path / "dps"), "--no-progress",
                     "--set", "algorithm=dps", "--set", f"dps.reference={tmp_path / 'ce' / 'checkpoint'}",
                     "--set", "masking=0.6"]) == 0
    capsys.readouterr()
    theta0 = models.load_weights_file(pre)
    ref = load_checkpoint(tmp_path / "ce" / "checkpoint").model_state
    final = load_checkpoint(tmp_path / "dps" / "checkpoint").model_state
    masks = suppression.select_rows(suppression.rank_scores(theta0, ref), 0.6, "top")
    suppressed = 0
    for name, mask in masks.items():
        same = (final[name] == theta0[name]).flatten(1).all(1)  # [rows]
        assert torch.equal(same, mask), name
        suppressed += int(mask.sum())
    assert suppressed == math.floor(0.6 * sum(m.numel() for m in masks.values()))
    # The trial records what it held, per group, in its checkpoint's metrics.
    recorded = load_checkpoint(tmp_path / "dps" / "checkpoint").metrics
    expected = suppression.holding_metrics(suppression.holdings(masks, models.parameter_shapes("tiny-vit")))
    assert {k: v for k, v in recorded.items() if k.startswith("dps_")} == pytest.approx(expected)
    assert recorded["dps_rows_held"] == suppressed and 0 < recorded["dps_params_train_frac"] < 1


def test_rank_command_writes_and_summarizes(tmp_path, capsys):
    pre = _pretrained_file(tmp_path)
    ref = tmp_path / "ref.safetensors"
    theta = models.load_weights_file(pre)
    save_file({k: v + 0.01 * torch.randn_like(v) for k, v in theta.items()}, str(ref))
    out = tmp_path / "ranking.pt"
    code = cli.main(["rank", "--model", "tiny-vit", "--pretrained", str(pre), "--reference", str(ref),
                     "--masking", "0.9", "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0
    scores = suppression.load_ranking(out)
    total = sum(s.numel() for s in scores.values())
    assert f"{math.floor(0.9 * total)} / {total}" in " ".join(text.split())
    assert "token_embedding.weight" in text and "visual.conv1.weight" in text
    # the per-group table: the token embedding's row counts, and the total of the parameters held
    held = suppression.holdings(suppression.select_rows(scores, 0.9), models.parameter_shapes("tiny-vit"))
    token = next(r for r in held if r.group == "token embedding")
    lines = {line.split("  ")[0].strip(): " ".join(line.split()) for line in text.splitlines()}
    assert f"{token.rows_held:,} / {token.rows_ranked:,}" in lines["token embedding"]
    assert f"{held[-1].params_held:,} / {held[-1].params:,}" in lines["total"]
    blob = torch.load(out, weights_only=True)
    assert blob["rule"] == suppression.RULE_VERSION


def test_rank_checks_its_reference_before_building_a_model(tmp_path, capsys, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was built before --reference was checked")

    monkeypatch.setattr(models, "pretrained_state_dict", no_model)
    out = tmp_path / "ranking.pt"
    code = cli.main(["rank", "--model", "tiny-vit", "--pretrained", "none", "--reference", str(tmp_path / "nope"),
                     "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"--reference = '{tmp_path / 'nope'}': no such file" in err[0], err
    assert not out.exists()


def test_a_tie_at_the_cut_goes_to_the_earlier_tensor_and_row():
    """Equal scores straddle the cut: the first in (tensor, row) order is suppressed, as the rule says."""
    scores = {"a.weight": torch.tensor([0.9, 0.5, 0.5]), "b.weight": torch.tensor([0.5, 0.1])}
    top2 = suppression.select_rows(scores, 0.4, "top")  # k = 2: 0.9, then the first of three 0.5s
    assert top2["a.weight"].tolist() == [True, True, False] and top2["b.weight"].tolist() == [False, False]
    top3 = suppression.select_rows(scores, 0.6, "top")  # k = 3: two of the three 0.5s, both in a
    assert top3["a.weight"].tolist() == [True, True, True] and top3["b.weight"].tolist() == [False, False]
    bottom2 = suppression.select_rows(scores, 0.4, "bottom")  # top's counts, each tensor's tail of the same order
    assert bottom2["a.weight"].tolist() == [False, True, True] and bottom2["b.weight"].tolist() == [False, False]


def test_suppressed_rows_get_a_zero_gradient_before_clipping():
    """Clipping (optim.grad_clip) sees no gradient on held rows: the hook zeroes them on accumulation."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6))
    masks = {"0.weight": torch.tensor([True, False, True, False, False, False])}
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    suppression.RowSuppressor(model, masks).attach(opt)
    model(torch.randn(8, 4)).pow(2).sum().backward()
    grad = model[0].weight.grad
    assert torch.count_nonzero(grad[[0, 2]]) == 0 and torch.count_nonzero(grad[[1, 3, 4, 5]]) > 0
    # so the norm clipping scales by is that of the trained rows alone
    total = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)
    others = torch.cat([grad[[1, 3, 4, 5]].flatten(), model[0].bias.grad])
    assert total.item() == pytest.approx(others.norm().item())


def test_holdings_per_group_counted_by_hand():
    shapes = {
        "visual.conv1.weight": (4, 3, 2, 2),  # stem: 4 rows of 12
        "visual.ln_pre.weight": (2,),  # stem, never ranked
        "visual.transformer.resblocks.0.ln_1.weight": (2,),  # attention
        "visual.transformer.resblocks.0.attn.in_proj_weight": (6, 2),  # attention: 6 rows of 2
        "visual.transformer.resblocks.0.attn.in_proj_bias": (6,),
        "visual.transformer.resblocks.0.mlp.c_fc.weight": (8, 2),  # MLP: 8 rows of 2
        "visual.proj": (2, 3),  # stem & projection: 2 rows of 3
        "transformer.resblocks.0.attn.out_proj.weight": (3, 3),
        "transformer.resblocks.0.mlp.c_proj.weight": (3, 5),
        "token_embedding.weight": (10, 3),
        "positional_embedding": (4, 3),  # text stem, excluded from the ranking
        "text_projection": (3, 3),
        "logit_scale": (),
    }
    held = {"visual.conv1.weight": [0, 1], "visual.transformer.resblocks.0.attn.in_proj_weight": [0, 2, 4],
            "visual.transformer.resblocks.0.mlp.c_fc.weight": [], "visual.proj": [1],
            "transformer.resblocks.0.attn.out_proj.weight": [0, 1, 2], "transformer.resblocks.0.mlp.c_proj.weight": [],
            "token_embedding.weight": [5, 6, 7, 8, 9], "text_projection": []}
    masks = {n: torch.zeros(shapes[n][0], dtype=torch.bool).index_fill_(0, torch.tensor(r, dtype=torch.long), True)
             for n, r in held.items()}
    rows = {r.group: r for r in suppression.holdings(masks, shapes)}
    H = suppression.Holding
    # stem & projection: conv1 (48) + ln_pre (2) + proj (6) = 56; held 2·12 + 1·3 = 27; rows 3 of 6
    assert rows["visual stem & projection"] == H("visual stem & projection", 6, 3, 56, 27)
    # attention: ln_1 (2) + in_proj (12) + bias (6) = 20; held 3·2 = 6
    assert rows["visual attention"] == H("visual attention", 6, 3, 20, 6)
    assert rows["visual MLP"] == H("visual MLP", 8, 0, 16, 0)
    assert rows["text attention"] == H("text attention", 3, 3, 9, 9)
    assert rows["text MLP"] == H("text MLP", 3, 0, 15, 0)
    assert rows["token embedding"] == H("token embedding", 10, 5, 30, 15)
    assert rows["text stem & projection"] == H("text stem & projection", 3, 0, 21, 0)  # positional 12 + proj 9
    assert rows["other"] == H("other", 0, 0, 1, 0)  # logit_scale
    assert "visual conv blocks" not in rows
    total = rows["total"]
    assert total == H("total", 39, 14, 168, 57)
    assert total.params_held_frac == pytest.approx(57 / 168) and total.params_train_frac == pytest.approx(111 / 168)
    assert rows["visual attention"].rows_held_frac == 0.5 and rows["token embedding"].params_held_frac == 0.5
    metrics = suppression.holding_metrics(list(rows.values()))
    assert metrics["dps_params_train_frac"] == pytest.approx(111 / 168)
    assert metrics["dps_held_frac_visual_stem_projection"] == pytest.approx(27 / 56)
    assert metrics["dps_held_frac_token_embedding"] == 0.5
    table = "\n".join(suppression.format_holdings(list(rows.values())))
    assert "token embedding" in table and "57 / 168" in table and "66.1%" in table


@pytest.mark.parametrize("arch,groups", [
    ("tiny-vit", {"visual stem & projection", "visual attention", "visual MLP", "text attention", "text MLP",
                  "token embedding", "text stem & projection", "other"}),
    ("tiny-rn", {"visual stem & projection", "visual attention", "visual conv blocks", "text attention", "text MLP",
                 "token embedding", "text stem & projection", "other"}),
])
def test_every_open_clip_parameter_has_its_group(arch, groups):
    shapes = models.parameter_shapes(arch)
    by_group = {}
    for name in shapes:
        by_group.setdefault(suppression.tensor_group(name), []).append(name)
    assert set(by_group) == groups
    assert by_group["other"] == ["logit_scale"]
    assert by_group["token embedding"] == ["token_embedding.weight"]
    if arch == "tiny-rn":
        assert "visual.attnpool.q_proj.weight" in by_group["visual attention"]
        assert "visual.attnpool.c_proj.weight" in by_group["visual stem & projection"]
        assert "visual.layer1.0.conv1.weight" in by_group["visual conv blocks"]
    else:
        assert "visual.transformer.resblocks.0.ln_2.weight" in by_group["visual MLP"]
        assert "visual.conv1.weight" in by_group["visual stem & projection"]
