import hashlib

import numpy as np
import pytest
import torch

from dps_tune.data import datasets as data_mod
from dps_tune.data import synthetic
from dps_tune.config import DataConfig, SyntheticConfig
from dps_tune.errors import DataError
from support.datasets import IWILDCAM_SPLITS, make_iwildcam
from support.worlds import TINY_WORLD


def test_iwildcam_layout_splits_and_names(tmp_path):
    base = make_iwildcam(tmp_path)
    spec = data_mod.load_dataset(DataConfig(dataset="iwildcam", root=str(tmp_path)))
    sizes = dict((s, n) for s, n, _ in IWILDCAM_SPLITS)
    # Each of our splits holds exactly the rows of its WILDS split, in file order: a swap
    # of id_val and id_test (same size here) or of val and test is caught by the file names.
    rows = [line.split(",") for line in (base / "metadata.csv").read_text().splitlines()[1:]]
    for ours, wilds in (("id_val", "id_val"), ("id_test", "id_test"), ("ood_val", "val"), ("ood_test", "test")):
        expected = [(str(base / "train" / r[1]), int(r[2])) for r in rows if r[0] == wilds]
        assert list(zip(spec.splits[ours].paths, spec.splits[ours].labels)) == expected, ours
    assert len(spec.train_images) == sizes["train"]
    assert set(spec.train_images.paths) == {str(base / "train" / r[1]) for r in rows if r[0] == "train"}
    # FLYP: each training image once per template, captioned with that template
    assert spec.templates == ("a photo of {c}.", "{c} in the wild.")
    assert len(spec.train_pairs) == 2 * sizes["train"]
    assert spec.train_pairs.captions[:2] == ("a photo of empty.", "empty in the wild.")
    # class names from the dataset's own category file: y >= 99999 dropped, lower-cased
    assert spec.classnames == ("empty", "tayassu pecari", "meleagris ocellata")
    assert all(p.startswith(str(tmp_path / "iwildcam_v2.0" / "train")) for p in spec.splits["id_test"].paths)


def test_iwildcam_english_names(tmp_path):
    make_iwildcam(tmp_path)
    cfg = DataConfig(dataset="iwildcam", root=str(tmp_path / "iwildcam_v2.0"), classnames=str(tmp_path / "labels.csv"))
    spec = data_mod.load_dataset(cfg)
    assert spec.classnames == ("empty english", "peccary english", "turkey english")


def test_missing_image_names_file_and_row(tmp_path):
    base = make_iwildcam(tmp_path)
    victim = sorted((base / "train").glob("*.jpg"))[13]  # an id_val image
    victim.unlink()
    spec = data_mod.load_dataset(DataConfig(dataset="iwildcam", root=str(tmp_path)))
    ds = data_mod.ImageDataset(spec.splits["id_val"], lambda im: torch.zeros(1))
    with pytest.raises(DataError) as err:
        for i in range(len(ds)):
            ds[i]
    msg = str(err.value)
    assert victim.name in msg and "row 15 of" in msg and "metadata.csv" in msg and "no such file" in msg


def test_unreadable_image_is_reported(tmp_path):
    base = make_iwildcam(tmp_path)
    victim = sorted((base / "train").glob("*.jpg"))[0]
    victim.write_bytes(b"not a jpeg")
    spec = data_mod.load_dataset(DataConfig(dataset="iwildcam", root=str(tmp_path)))
    with pytest.raises(DataError, match=f"{victim.name}.*row 2 of .*unreadable"):
        data_mod.ImageDataset(spec.train_images, lambda im: im)[0]


def test_csv_dataset(tmp_path):
    world = synthetic.generate(SyntheticConfig(**TINY_WORLD), tmp_path / "w")
    cfg = DataConfig(dataset="csv", train_csv=str(world / "train.csv"), classnames=str(world / "classnames.txt"),
                     eval_csvs=(("id_val", str(world / "id_val.csv")),), eval_splits=("id_val",))
    spec = data_mod.load_dataset(cfg)
    assert spec.classnames == synthetic.CLASSNAMES[:4]
    assert len(spec.train_pairs) == 2 * len(spec.train_images) == 2 * 4 * 8
    assert set(spec.splits) == {"id_val"}


def test_csv_missing_column_and_bad_label(tmp_path):
    (tmp_path / "names.txt").write_text("a\nb\n")
    (tmp_path / "train.csv").write_text("path\ttitle\tlabel\nx.png\ta photo\t0\n")
    cfg = DataConfig(dataset="csv", train_csv=str(tmp_path / "train.csv"), classnames=str(tmp_path / "names.txt"),
                     eval_splits=())
    with pytest.raises(DataError, match="missing column.*filepath"):
        data_mod.load_dataset(cfg)
    (tmp_path / "train.csv").write_text("filepath\ttitle\tlabel\nx.png\ta photo\t7\n")
    with pytest.raises(DataError, match="row 2: label 7 outside 0..1"):
        data_mod.load_dataset(cfg)


def test_synthetic_world_is_deterministic(tmp_path):
    a = synthetic.generate(SyntheticConfig(**TINY_WORLD), tmp_path / "a")
    b = synthetic.generate(SyntheticConfig(**TINY_WORLD), tmp_path / "b")

    def digest(root):
        h = hashlib.sha256()
        for p in sorted(root.rglob("*")):
            if p.is_file() and p.name != "world.json":
                h.update(p.relative_to(root).as_posix().encode() + p.read_bytes())
        return h.hexdigest()

    assert digest(a) == digest(b)
    other = synthetic.generate(SyntheticConfig(**{**TINY_WORLD, "seed": 1}), tmp_path / "c")
    assert digest(other) != digest(a)


def test_eroding_worlds_ood_split_is_a_different_domain(tmp_path):
    from PIL import Image
    import numpy as np

    root = synthetic.generate(SyntheticConfig(**TINY_WORLD, world="eroding"), tmp_path / "w")
    spec = data_mod.load_dataset(DataConfig(dataset="synthetic", root=str(root)))

    def pixels(records) -> np.ndarray:  # [images, H, W, 3]
        return np.stack([np.asarray(Image.open(p), dtype=np.float32) for p in records.paths])

    day, dusk = pixels(spec.splits["id_test"]), pixels(spec.splits["ood_test"])
    # Dusk is darker than daylight, and warmer: less blue for its red.
    assert dusk.mean() < 0.7 * day.mean()
    blue_for_red = lambda a: a[..., 2].mean() / a[..., 0].mean()  # noqa: E731
    assert blue_for_red(dusk) < 0.7 * blue_for_red(day)


def test_epoch_sampler_resumes_mid_epoch():
    full = list(data_mod.EpochSampler(20, 4, seed=3, epoch=2))
    tail = list(data_mod.EpochSampler(20, 4, seed=3, epoch=2, start_batch=2))
    assert tail == full[8:]
    assert sorted(i for i, _ in full) == list(range(20))
    assert full != list(data_mod.EpochSampler(20, 4, seed=3, epoch=3))


def test_train_transform_shape_and_determinism(tmp_path):
    from PIL import Image

    img = Image.new("RGB", (80, 60), (200, 100, 50))
    tf = data_mod.TrainTransform(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    a = tf(img, torch.Generator().manual_seed(1))
    assert a.shape == (3, 32, 32)
    assert a[0].mean().item() == pytest.approx((200 / 255 - 0.5) / 0.25, abs=0.02)
    # On a textured image the crop shows: the same seed gives the same pixels, another seed others.
    textured = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8))
    crops = [tf(textured, torch.Generator().manual_seed(seed)) for seed in (1, 1, 2)]
    assert torch.equal(crops[0], crops[1]) and not torch.equal(crops[0], crops[2])
    for seed in range(50):  # crop boxes keep 90-100% of the area
        top, left, h, w = data_mod.crop_params(60, 80, torch.Generator().manual_seed(seed))
        assert 0.9 * 4800 - 80 <= h * w <= 4800 and top + h <= 60 and left + w <= 80


def test_config_with_missing_csv_split(tmp_path):
    world = synthetic.generate(SyntheticConfig(**TINY_WORLD), tmp_path / "w")
    cfg = DataConfig(dataset="csv", train_csv=str(world / "train.csv"), classnames=str(world / "classnames.txt"),
                     eval_splits=("ood_test",))
    with pytest.raises(DataError, match="asks for 'ood_test' but no CSV"):
        data_mod.load_dataset(cfg)
