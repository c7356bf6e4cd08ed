"""A procedurally generated world with a real distribution shift, in seconds, from a seed.

Named shape classes are photographed at camera *locations*, in the spirit of iWildCam:

* **ID** (train, ``id_val``, ``id_test``): daylight cameras at four known locations.
  As with real camera traps, each location sees some species more often than others,
  so the background carries a little (spurious) information about the label.
* **OOD** (``ood_val``, ``ood_test``): new locations filmed at night in infrared:
  grey, dark, noisy and slightly blurred, with none of the ID backgrounds.

The world is written to disk in the FLYP CSV format (tab-separated ``filepath``,
``title``, ``label``) plus ``classnames.txt``, so it goes through exactly the same
loading code as user data. :func:`render` is also used to build the pretraining set
of the demo's tiny CLIP, which sees many more domains (see :mod:`dps_tune.demo.pretrain`).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from dps_tune.config import SyntheticConfig
from dps_tune.paths import cache_dir

logger = logging.getLogger(__name__)

CLASSNAMES = ("circle", "square", "triangle", "star", "cross", "heart", "ring", "diamond", "crescent", "arrow")
TEMPLATES = ("a photo of a {c}.", "a {c} in the wild.")
WORLD_VERSION = 2

# Domains: how a camera renders a scene.
DOMAINS = ("day", "night", "dusk", "snow", "fog", "sketch")
ID_DOMAIN, OOD_DOMAIN = "day", "night"
ID_LOCATIONS = (0, 1, 2, 3)
OOD_LOCATIONS = {"ood_val": (4, 5), "ood_test": (6, 7)}
# Probability that an ID image of class c is taken at its "home" location c % 4.
HOME_BIAS = 0.5


@dataclass(frozen=True)
class Scene:
    label: int
    domain: str
    location: int


def _shape_polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    def rot(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
        c, s = math.cos(angle), math.sin(angle)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]

    if kind == "square":
        return rot([(-r, -r), (r, -r), (r, r), (-r, r)])
    if kind == "triangle":
        return rot([(r * math.cos(a), r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)])
    if kind == "star":
        pts = []
        for i in range(10):
            rr = r if i % 2 == 0 else 0.42 * r
            a = -math.pi / 2 + i * math.pi / 5
            pts.append((rr * math.cos(a), rr * math.sin(a)))
        return rot(pts)
    if kind == "cross":
        w = 0.33 * r
        return rot([(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w)])
    if kind == "heart":
        pts = []
        for i in range(40):
            t = 2 * math.pi * i / 40
            x = 16 * math.sin(t) ** 3
            y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
            pts.append((x * r / 17, y * r / 17))
        return rot(pts)
    if kind == "diamond":
        return rot([(0, -r), (0.55 * r, 0), (0, r), (-0.55 * r, 0)])
    if kind == "crescent":
        outer = [(r * math.cos(a), r * math.sin(a)) for a in np.linspace(-math.pi / 2, 3 * math.pi / 2, 30)]
        inner = [(0.45 * r + 0.8 * r * math.cos(a), 0.8 * r * math.sin(a))
                 for a in np.linspace(3 * math.pi / 2, -math.pi / 2, 30)]
        return rot(outer + inner)
    if kind == "arrow":
        return rot([(-r, -0.22 * r), (0.2 * r, -0.22 * r), (0.2 * r, -0.6 * r), (r, 0), (0.2 * r, 0.6 * r),
                    (0.2 * r, 0.22 * r), (-r, 0.22 * r)])
    raise ValueError(kind)


@functools.lru_cache(maxsize=256)
def _location_background(location: int, size: int) -> np.ndarray:
    """A fixed scene per location (sky and terrain colour, horizon, bushes): [H, W, 3] float32, read-only.

    The bushes are wide, soft and close to the terrain colour, so no part of a
    background looks like a shape class (round blobs were indistinguishable from
    "circle"). Cached: it is a pure function of its arguments, costs more than the
    rest of a render, and the pretraining set draws thousands of images from a few
    hundred locations.
    """
    rng = np.random.default_rng([7919, location])
    base = rng.uniform(0.25, 0.75, 3) * np.array([0.8, 1.0, 0.6])
    top = np.clip(base + rng.uniform(-0.25, 0.25, 3), 0, 1)
    horizon = rng.uniform(0.25, 0.65)
    yy = np.linspace(0, 1, size)[:, None, None]
    img = np.where(yy < horizon, top, base) * np.ones((size, size, 3))
    xx, yv = np.meshgrid(np.arange(size), np.arange(size))
    for _ in range(6):
        cx, cy = rng.uniform(0, size), rng.uniform(horizon * size, size)
        rx = rng.uniform(size / 5, size / 2.5)
        ry = rx * rng.uniform(0.15, 0.35)
        colour = np.clip(base + rng.uniform(-0.15, 0.15, 3), 0, 1)
        img[((xx - cx) / rx) ** 2 + ((yv - cy) / ry) ** 2 < 1] = colour
    soft = Image.fromarray((img * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(radius=size / 48))
    out = np.asarray(soft, dtype=np.float32) / 255.0
    out.setflags(write=False)  # shared by every render at this location
    return out


def render(scene: Scene, size: int, rng: np.random.Generator) -> Image.Image:
    """Draw one image of ``scene`` at ``size``×``size`` pixels."""
    kind = CLASSNAMES[scene.label]
    scale = 2  # draw at 2x and downsample: cheap anti-aliasing
    big = size * scale
    bg = _location_background(scene.location, big)
    bg = bg + rng.normal(0, 0.04, (1, 1, 3))  # per-shot exposure jitter
    r = rng.uniform(0.22, 0.36) * big
    cx, cy = rng.uniform(r, big - r), rng.uniform(r, big - r)
    angle = rng.uniform(-0.5, 0.5) if kind in ("heart", "arrow", "triangle") else rng.uniform(0, 2 * math.pi)
    if kind == "arrow":
        angle = rng.choice([0.0, math.pi]) + rng.uniform(-0.4, 0.4)
    hue = rng.uniform(0.15, 1.0, 3)
    canvas = Image.fromarray((np.clip(bg, 0, 1) * 255).astype(np.uint8))
    mask = Image.new("L", canvas.size, 0)  # where the subject is: the night camera's flash lights it
    for layer, fill in ((ImageDraw.Draw(canvas), tuple(int(v * 255) for v in hue)), (ImageDraw.Draw(mask), 255)):
        if kind == "circle":
            layer.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif kind == "ring":
            layer.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=max(2, int(0.3 * r)))
        else:
            layer.polygon(_shape_polygon(kind, cx, cy, r, angle), fill=fill)
    img = np.asarray(canvas.resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
    subject = np.asarray(mask.resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0  # [H, W]
    img = _apply_domain(img, subject, scene.domain, rng)
    out = Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))
    if scene.domain in ("night", "fog"):
        out = out.filter(ImageFilter.GaussianBlur(radius=0.6 if scene.domain == "night" else 1.0))
    return out


def _apply_domain(img: np.ndarray, subject: np.ndarray, domain: str, rng: np.random.Generator) -> np.ndarray:
    """[H, W, 3] in [0, 1] -> the same scene as this kind of camera sees it; ``subject`` is [H, W] in [0, 1]."""
    if domain == "day":
        return img + rng.normal(0, 0.03, img.shape)
    if domain == "night":
        # Infrared: grey, dark, low contrast, sensor noise. The flash lights the near
        # subject a little more than the far background, as in real camera-trap photos.
        grey = img @ np.array([0.3, 0.59, 0.11])
        grey = 0.12 + 0.55 * grey * rng.uniform(0.6, 1.0) + rng.uniform(0.05, 0.15) * subject
        return np.repeat(grey[..., None], 3, axis=2) + rng.normal(0, 0.09, img.shape[:2] + (1,))
    if domain == "dusk":
        return img * np.array([1.0, 0.7, 0.45]) * 0.8 + rng.normal(0, 0.04, img.shape)
    if domain == "snow":
        return 0.55 * img + 0.45 + rng.normal(0, 0.03, img.shape)
    if domain == "fog":
        return 0.5 * img + 0.35 + rng.normal(0, 0.02, img.shape)
    if domain == "sketch":
        grey = img @ np.array([0.3, 0.59, 0.11])
        gy, gx = np.gradient(grey)
        edges = np.clip(1.0 - 6.0 * np.hypot(gx, gy), 0, 1)
        return np.repeat(edges[..., None], 3, axis=2)
    raise ValueError(domain)


def _scenes(split: str, classes: int, per_class: int, rng: np.random.Generator) -> list[Scene]:
    scenes = []
    for label in range(classes):
        for _ in range(per_class):
            if split in OOD_LOCATIONS:
                scenes.append(Scene(label, OOD_DOMAIN, int(rng.choice(OOD_LOCATIONS[split]))))
                continue
            home = ID_LOCATIONS[label % len(ID_LOCATIONS)]
            loc = home if rng.random() < HOME_BIAS else int(rng.choice(ID_LOCATIONS))
            scenes.append(Scene(label, ID_DOMAIN, loc))
    return scenes


SPLIT_FILES = ("train", "id_val", "id_test", "ood_val", "ood_test")


def world_key(cfg: SyntheticConfig) -> str:
    return "world-v{}-s{seed}-c{classes}-t{train_per_class}-e{eval_per_class}-px{image_size}".format(
        WORLD_VERSION, **asdict(cfg))


def default_root(cfg: SyntheticConfig) -> Path:
    return cache_dir() / "synthetic" / world_key(cfg)


def generate(cfg: SyntheticConfig, root: str | os.PathLike | None = None) -> Path:
    """Write the world to ``root`` (default: the user cache) unless it is already there.

    Generation goes to a temporary directory that is renamed into place when complete,
    so an interrupted run never leaves a half-written world behind.
    """
    root = Path(root) if root is not None else default_root(cfg)
    if (root / "world.json").is_file():
        return root
    tmp = root.with_name(root.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    names = CLASSNAMES[: cfg.classes]
    for split_id, split in enumerate(SPLIT_FILES):
        rng = np.random.default_rng([cfg.seed, split_id])
        per_class = cfg.train_per_class if split == "train" else cfg.eval_per_class
        rows = []
        for i, scene in enumerate(_scenes(split, cfg.classes, per_class, rng)):
            rel = f"images/{split}_{i:05d}.png"
            render(scene, cfg.image_size, np.random.default_rng([cfg.seed, split_id, i])).save(tmp / rel)
            templates = TEMPLATES if split == "train" else TEMPLATES[:1]
            for t in templates:
                rows.append(f"{rel}\t{t.format(c=names[scene.label])}\t{scene.label}\t{scene.location}")
        (tmp / f"{split}.csv").write_text("filepath\ttitle\tlabel\tlocation\n" + "\n".join(rows) + "\n")
    (tmp / "classnames.txt").write_text("\n".join(names) + "\n")
    (tmp / "world.json").write_text(json.dumps({"version": WORLD_VERSION, **asdict(cfg),
                                                "templates": list(TEMPLATES)}, indent=2))
    root.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(tmp, root)
    except OSError:  # another process finished first: theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("synthetic world written to %s", root)
    return root
