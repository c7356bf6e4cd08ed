"""The CUDA fast path: bf16 step, compiled step, DPS with fused AdamW, two 0.5-GPU trials.

Skipped without a CUDA device; ``scripts/gpu_check.sh`` runs them on a GPU machine.
"""

import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from dps_tune.data import datasets as data_mod
from dps_tune import models, suppression
from dps_tune.bench.rank import fine_tune_stand_in
from dps_tune.config import config_from_dict
from dps_tune.methods import Batch, CEObjective, DPSObjective
from dps_tune.optim import build_optimizer
from dps_tune.train import Runtime, compile_with_fallback, resolve_runtime, train_step
from support.worlds import tiny_raw

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

REPO = Path(__file__).resolve().parents[1]
CLASSES = 6


def _cuda_runtime() -> Runtime:
    rt = resolve_runtime(config_from_dict(tiny_raw(**{"train.device": "cuda"})))
    # What a trial gets on CUDA by default.
    assert rt.device.type == "cuda" and rt.bf16 and rt.fused_adamw and rt.compile
    return rt


def _parts(seed: int = 0):
    """tiny-vit on the GPU with random weights, class prompts [T, C, L] and one batch."""
    torch.manual_seed(seed)
    model = models.create_model("tiny-vit", "none", device="cuda")
    model.train()
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, model.vocab_size, (2, CLASSES, model.context_length), generator=gen).cuda()
    images = torch.randn(16, 3, 32, 32, generator=gen).cuda()  # [B, 3, H, W]
    labels = torch.randint(CLASSES, (16,), generator=gen).cuda()  # [B]
    return model, tokens, Batch(images, labels)


def test_bf16_step_runs_matmuls_in_bf16_and_updates_fp32_weights_with_fused_adamw():
    rt = _cuda_runtime()
    model, tokens, batch = _parts()
    objective = CEObjective(tokens, seed=0)
    optimizer = build_optimizer(model, lr=1e-3, wd=0.1, betas=(0.9, 0.999), eps=1e-8, fused=rt.fused_adamw)
    assert optimizer.defaults["fused"] is True
    seen = []
    # A linear layer's output: the residual stream itself stays fp32 in open_clip.
    c_fc = model.visual.transformer.resblocks[0].mlp.c_fc
    hook = c_fc.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
    before = model.visual.conv1.weight.detach().clone()
    loss = train_step(model, objective, optimizer, batch, rt)
    hook.remove()
    assert seen == [torch.bfloat16]
    assert loss.dtype == torch.float32 and loss.device.type == "cuda" and torch.isfinite(loss).item()
    assert model.visual.conv1.weight.dtype == torch.float32
    assert not torch.equal(model.visual.conv1.weight, before)


def test_compiled_step_loss_matches_eager(caplog):
    rt = _cuda_runtime()
    caplog.set_level(logging.INFO, logger="dps_tune")
    losses = {}
    for name, compile_fn in (("eager", None), ("compiled", compile_with_fallback)):
        model, tokens, batch = _parts()
        objective = CEObjective(tokens, seed=0, compile_fn=compile_fn)
        optimizer = build_optimizer(model, lr=1e-4, wd=0.1, betas=(0.9, 0.999), eps=1e-8, fused=True)
        losses[name] = torch.stack([train_step(model, objective, optimizer, batch, rt) for _ in range(3)]).cpu()
    assert "torch.compile failed" not in caplog.text
    assert "torch.compile of ce_logits_loss took" in caplog.text
    # bf16 kernels differ between inductor and eager, so equal within bf16 tolerance, not bit for bit.
    torch.testing.assert_close(losses["compiled"], losses["eager"], rtol=2e-2, atol=2e-3)


def test_dps_suppression_holds_bit_for_bit_with_fused_adamw_bf16_and_compile():
    rt = _cuda_runtime()
    model, tokens, batch = _parts()
    theta0 = models.plain_state_dict(model)  # a CPU copy of θ0
    on_gpu = {k: v.cuda() for k, v in theta0.items()}
    masks = suppression.select_rows(suppression.rank_scores(on_gpu, fine_tune_stand_in(on_gpu)), 0.5)
    sup = suppression.RowSuppressor(model, masks)
    objective = DPSObjective(tokens, seed=0, suppressor=sup, compile_fn=compile_with_fallback)
    # A large learning rate and weight decay: anything short of an exact restore would show.
    optimizer = build_optimizer(model, lr=1e-2, wd=0.5, betas=(0.9, 0.999), eps=1e-8, fused=True)
    objective.attach(model, optimizer)
    for _ in range(4):
        train_step(model, objective, optimizer, batch, rt, grad_clip=1.0)
    params = {models.strip_wrapper_prefix(n): p.detach().cpu() for n, p in model.named_parameters()}
    moved_rows = 0
    for name, mask in masks.items():
        mask = mask.cpu()
        assert torch.equal(params[name][mask], theta0[name][mask]), name
        moved_rows += int((params[name][~mask] != theta0[name][~mask]).flatten(1).any(1).sum())
    assert moved_rows > 0
    assert sup.num_suppressed == suppression.suppressed_count(0.5, sup.num_ranked)


CHILD = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    import torch
    from dps_tune.config import config_from_dict
    from dps_tune.train import run_trial

    me, other, raw = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    torch.cuda.init()
    Path(me).touch()
    deadline = time.time() + 120
    while not Path(other).exists():  # start together, so the two trials really overlap
        if time.time() > deadline:
            raise SystemExit("the other trial never started")
        time.sleep(0.05)
    start = time.time()
    metrics = run_trial(config_from_dict(raw), memory_fraction=0.5)
    end = time.time()
    total = torch.cuda.get_device_properties(0).total_memory
    try:  # the cap must hold: 60% of the GPU is more than this process may take
        torch.empty(int(0.6 * total), dtype=torch.uint8, device="cuda")
        capped = False
    except torch.cuda.OutOfMemoryError:
        capped = True
    print(json.dumps({"start": start, "end": end, "capped": capped, "id_val_acc": metrics["id_val_acc"]}))
""")


def test_two_half_gpu_trials_run_together(tmp_path):
    raw = tiny_raw(**{"train.device": "cuda", "train.compile": "off", "optim.epochs": 2})
    data_mod.load_dataset(config_from_dict(raw).data)  # generate the world once, before the race
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    flags = [tmp_path / "a.ready", tmp_path / "b.ready"]
    procs = [
        subprocess.Popen([sys.executable, "-c", CHILD, str(flags[i]), str(flags[1 - i]), json.dumps(raw)],
                         cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    results = []
    deadline = time.time() + 300
    for p in procs:
        out, err = p.communicate(timeout=max(1, deadline - time.time()))
        assert p.returncode == 0, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    a, b = results
    assert a["start"] < b["end"] and b["start"] < a["end"], results  # the trials overlapped
    assert a["capped"] and b["capped"]
    assert 0 <= a["id_val_acc"] <= 1 and 0 <= b["id_val_acc"] <= 1
