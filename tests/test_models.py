import os
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from dps_tune import models
from dps_tune.errors import CheckpointError


def _random_tiny(seed=0):
    torch.manual_seed(seed)
    return models.create_model("tiny-vit", "none")


def _same_weights(a, b):
    sa, sb = models.plain_state_dict(a), models.plain_state_dict(b)
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_tiny_architectures_are_registered():
    assert {"tiny-vit", "small-vit"} <= set(open_clip.list_models())


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".bin"])
def test_load_local_weights_through_open_clip(tmp_path, suffix):
    src = _random_tiny(seed=1)
    path = tmp_path / f"weights{suffix}"
    state = models.plain_state_dict(src)
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    loaded = models.create_model("tiny-vit", str(path))
    assert _same_weights(src, loaded)
    assert not _same_weights(_random_tiny(seed=2), loaded)


def test_pretrained_tag_resolves_through_open_clip_hub_cache(tmp_path):
    """The real tag path: open_clip's tag table -> hf_hub_download, served offline from a local cache."""
    from open_clip import pretrained as oc_pretrained

    src = _random_tiny(seed=3)
    repo = tmp_path / "hub" / "models--dps-tune-tests--tiny-vit"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    save_file(models.plain_state_dict(src), str(snap / "open_clip_model.safetensors"))
    oc_pretrained._PRETRAINED.setdefault("tiny-vit", {})["unit_test_tag"] = oc_pretrained._pcfg(
        hf_hub="dps-tune-tests/tiny-vit/")
    try:
        assert "unit_test_tag" in models.list_pretrained_tags("tiny-vit")
        loaded = models.create_model("tiny-vit", "unit_test_tag", cache_dir=str(tmp_path / "hub"))
        assert _same_weights(src, loaded)
    finally:
        del oc_pretrained._PRETRAINED["tiny-vit"]["unit_test_tag"]


def test_a_fresh_process_knows_the_synthetic_tags_through_the_model_layer_alone():
    """What a Ray worker has: it imports the trainable, never the demo, and must still resolve
    ``pretrained: synthetic`` (models.TAG_PROVIDERS registers the demo's tags on first look-up)."""
    code = ("import sys\n"
            "from dps_tune import models\n"
            "assert 'dps_tune.demo.pretrain' not in sys.modules\n"
            "print(' '.join(sorted(t for t in models.list_pretrained_tags('tiny-rn') if t.startswith('synthetic'))))\n")
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["synthetic", "synthetic_eroding"]


def test_registered_file_tag(tmp_path):
    src = _random_tiny(seed=4)
    save_file(models.plain_state_dict(src), str(tmp_path / "w.safetensors"))
    models.register_pretrained_tag("tiny-vit", "unit_file_tag", tmp_path / "w.safetensors")
    assert _same_weights(src, models.create_model("tiny-vit", "unit_file_tag"))


def test_a_tag_resolves_in_every_spelling_open_clip_accepts(tmp_path):
    """open_clip looks a tag up lower-cased with '-' as '_': a tag registered with a dash (the eroding world's
    pretraining once was `synthetic-eroding`) must still be found, by loading and by the config check alike."""
    from open_clip import pretrained as oc_pretrained

    from dps_tune.preflight import check_model

    src = _random_tiny(seed=5)
    save_file(models.plain_state_dict(src), str(tmp_path / "w.safetensors"))
    models.register_pretrained_tag("tiny-vit", "Unit-Dash-Tag", tmp_path / "w.safetensors")
    try:
        for spelling in ("Unit-Dash-Tag", "unit_dash_tag", "unit-dash_tag"):
            assert _same_weights(src, models.create_model("tiny-vit", spelling)), spelling
            check_model("tiny-vit", spelling)
        assert "unit_dash_tag" in models.list_pretrained_tags("tiny-vit")
    finally:
        del oc_pretrained._PRETRAINED["tiny-vit"]["unit_dash_tag"]


def test_quick_gelu_follows_the_openai_tag(monkeypatch):
    seen = {}

    def fake_create(arch, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop before any download")

    monkeypatch.setattr(open_clip, "create_model", fake_create)
    with pytest.raises(CheckpointError):
        models.create_model("ViT-B-16", "openai")
    assert seen["force_quick_gelu"] is True and seen["pretrained"] == "openai"


def test_missing_hub_weights_are_a_one_line_error(tmp_path):
    with pytest.raises(CheckpointError) as err:
        models.create_model("ViT-B-16", "openai", cache_dir=str(tmp_path))
    assert "\n" not in str(err.value) and "openai" in str(err.value)


def test_mismatched_weights_are_refused(tmp_path):
    small = models.create_model("small-vit", "none")
    save_file(models.plain_state_dict(small), str(tmp_path / "small.safetensors"))
    with pytest.raises(CheckpointError, match="tiny-vit") as err:
        models.create_model("tiny-vit", str(tmp_path / "small.safetensors"))
    assert "\n" not in str(err.value)


def test_strip_wrapper_prefix():
    assert models.strip_wrapper_prefix("module._orig_mod.visual.proj") == "visual.proj"
    assert models.strip_wrapper_prefix("_orig_mod.module.token_embedding.weight") == "token_embedding.weight"
    assert models.strip_wrapper_prefix("visual.module_x") == "visual.module_x"


def test_pickled_module_is_refused(tmp_path):
    torch.save(_random_tiny(), tmp_path / "model.pt")  # a whole pickled module, as the paper code writes
    with pytest.raises(CheckpointError, match="cannot be read safely"):
        models.load_weights_file(tmp_path / "model.pt")


@pytest.mark.parametrize("name,content", [("cut.safetensors", b"\x08\x00\x00"), ("junk.safetensors", b"garbage" * 9),
                                          ("junk.pt", b"not a zip file at all"), ("empty.bin", b"")])
def test_a_corrupt_weights_file_is_one_line_before_any_work(name, content, tmp_path, write_yaml, capsys):
    from dps_tune import cli
    from support.worlds import tiny_raw

    bad = tmp_path / name
    bad.write_bytes(content)
    out = tmp_path / "run"
    assert cli.main(["train", str(write_yaml(tiny_raw(pretrained=str(bad)))), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"pretrained = '{bad}': not a readable weights file" in err[0], err
    assert not out.exists()  # nothing half-made
    assert cli.main(["rank", "--model", "tiny-vit", "--pretrained", "none", "--reference", str(bad),
                     "--out", str(tmp_path / "r.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--reference" in err[0] and "not a readable weights file" in err[0], err
    assert not (tmp_path / "r.pt").exists()


def test_the_safetensors_header_check_reads_what_safetensors_writes_and_refuses_every_cut(tmp_path):
    """The torch-free check behind every weights command: whole files pass, every shorter prefix is refused."""
    from safetensors.torch import save_file

    from dps_tune.layout import read_safetensors_header

    path = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(3, 4), "b": torch.ones(5, dtype=torch.int64)}, str(path), metadata={"m": "x"})
    header = read_safetensors_header(path, "k")
    assert set(header) == {"a", "b", "__metadata__"} and header["b"]["dtype"] == "I64"
    assert set(models.read_safetensors(path, "k")) == {"a", "b"}
    data = path.read_bytes()
    for cut in sorted({*range(0, len(data), 5), len(data) - 1}):
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=r"^k = .*(cut short|not a readable weights file)"):
            read_safetensors_header(path, "k")
