"""Exports rebuild the same network in plain open_clip: QuickGELU and the tiny architectures included."""

from __future__ import annotations

import json
import subprocess
import sys

import open_clip
import pytest
import torch
from safetensors.torch import load_file, save_file

from dps_tune import checkpoint, cli, models
from dps_tune.data import datasets as data_mod
from dps_tune.evaluate import evaluate_splits, tokenize_prompts
from support.worlds import tiny_raw

PLAIN_OPEN_CLIP = r"""
import json, sys
import open_clip, torch
from safetensors.torch import save_file
export, out = sys.argv[1], sys.argv[2]
open_clip.add_model_config(export)
name = json.load(open(f"{export}/config.json"))["open_clip_model"]
model = open_clip.create_model(name, pretrained=f"{export}/model.safetensors").eval()
assert not any(m.startswith("dps_tune") for m in sys.modules), "dps_tune was imported"
torch.manual_seed(0)
size = model.visual.image_size
size = size if isinstance(size, int) else size[0]
with torch.no_grad():
    feats = model.encode_image(torch.randn(4, 3, size, size))
save_file({"features": feats.contiguous(), **{k: v.contiguous() for k, v in model.state_dict().items()}}, out)
"""


@pytest.fixture
def quick_gelu_tag(tmp_path):
    """A pretrained tag for tiny-vit that, like OpenAI's, needs QuickGELU."""
    from open_clip import pretrained as oc_pretrained

    torch.manual_seed(7)
    weights = tmp_path / "qg.safetensors"
    save_file(models.plain_state_dict(models.create_model("tiny-vit", "none")), str(weights))
    models.register_pretrained_tag("tiny-vit", "unit_quickgelu", weights, quick_gelu=True)
    yield "unit_quickgelu"
    del oc_pretrained._PRETRAINED["tiny-vit"]["unit_quickgelu"]


@pytest.mark.parametrize("arch,name", [("tiny-vit", "tiny-vit-quickgelu"), ("tiny-rn", "tiny-rn")])
def test_export_reloads_in_plain_open_clip_with_the_same_weights_and_metrics(arch, name, quick_gelu_tag, tmp_path,
                                                                             write_yaml, capsys):
    pretrained = quick_gelu_tag if arch == "tiny-vit" else "none"
    raw = tiny_raw(model=arch, pretrained=pretrained)
    if arch == "tiny-rn":
        raw["data"]["synthetic"]["image_size"] = 64
    assert cli.main(["train", str(write_yaml(raw)), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    capsys.readouterr()
    export = checkpoint.export(tmp_path / "run" / "checkpoint", tmp_path / "best")
    recorded = json.loads((export / "config.json").read_text())
    assert recorded["open_clip_model"] == name
    assert json.loads((export / f"{name}.json").read_text()).get("quick_gelu", False) == (arch == "tiny-vit")

    # In a fresh interpreter that imports open_clip only, as a user of the export would.
    out = tmp_path / "plain.safetensors"
    proc = subprocess.run([sys.executable, "-c", PLAIN_OPEN_CLIP, str(export), str(out)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plain = load_file(str(out))
    ours = checkpoint.load_checkpoint(export, with_state=False).model_state
    assert all(torch.equal(plain[k], v) for k, v in ours.items())

    # The same network: dps_tune's own build gives the same features, and the recorded metrics again.
    model = models.create_model(arch, pretrained)
    model.load_state_dict(ours)
    model.eval()
    torch.manual_seed(0)
    size = models.image_size(model)
    with torch.no_grad():
        assert torch.equal(model.encode_image(torch.randn(4, 3, size, size)), plain["features"])
    cfg = checkpoint.read_config(export)
    spec = data_mod.load_dataset(cfg.data)
    prompts = tokenize_prompts(models.get_tokenizer(arch), spec.classnames, spec.templates)
    loaders = {s: data_mod.eval_loader(r, models.eval_transform(model), batch_size=64, workers=0)
               for s, r in spec.splits.items()}
    again = evaluate_splits(model, prompts, loaders)
    metrics = json.loads((export / "metrics.json").read_text())
    assert again and all(again[k] == metrics[k] for k in again)


def test_the_plain_gelu_build_of_quick_gelu_weights_differs(quick_gelu_tag):
    """Why the export names tiny-vit-quickgelu: the plain name builds another network."""
    quick = models.create_model("tiny-vit", quick_gelu_tag).eval()
    gelu = open_clip.create_model("tiny-vit").eval()
    gelu.load_state_dict(quick.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(quick.encode_image(x), gelu.encode_image(x))
