"""A procedurally generated world with a real distribution shift, in seconds, from a seed.

Named shape classes are photographed by camera traps at numbered *locations*, in the
spirit of iWildCam. Two worlds (``data.synthetic.world``):

* ``wild`` (the default), iWildCam's regime. ID (train, ``id_val``, ``id_test``) and OOD
  (``ood_val``, ``ood_test``) both mix times of day and weather (day, night infrared,
  dusk, fog, snow). ID comes from 12 known camera locations; each OOD split from 12 new
  ones, with their own backgrounds, viewpoints (how far the subject stands, how the
  camera is tilted, how much vegetation is in front; OOD cameras are tilted more and
  have more branches) and class frequencies. The demo's pretraining never sees a
  camera-trap photo of any of these locations, nor most of their conditions, so
  zero-shot starts weak and fine-tuning helps on both sides.
* ``eroding``, the regime of CLIP on ImageNet and its shifts: ID is daylight at the same
  12 locations, OOD is 12 new locations per split at dusk (a warm cast, less light), and
  the demo's pretraining for this world (``pretrained: synthetic_eroding``) has seen every
  camera domain, dusk included. Zero-shot is robust there and fine-tuning erodes it: CE
  gains on ID and little or nothing on OOD, and an interior WiSE-FT mix of the two beats
  both on OOD, as the WiSE-FT paper reports on ImageNet's shifts. (With OOD at night in
  infrared, as up to world version 4, every interior mix traded OOD for ID: fine-tuning on
  daylight colour learned nothing that carries over to grey infrared.)

In both worlds each location sees some classes more often than others, so the
background carries a little (spurious) information about the label, and every class
has the same number of images in every split.

The world is written to disk in the FLYP CSV format (tab-separated ``filepath``,
``title``, ``label``) plus ``classnames.txt``, so it goes through exactly the same
loading code as user data. :func:`render` is also used to build the pretraining sets
of the demo's tiny CLIP (see :mod:`dps_tune.demo.pretrain`).
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

from dps_tune.config import SYNTHETIC_WORLDS, SyntheticConfig
from dps_tune.paths import cache_dir

logger = logging.getLogger(__name__)

CLASSNAMES = ("circle", "square", "triangle", "star", "cross", "heart", "ring", "diamond", "crescent", "arrow")
TEMPLATES = ("a photo of a {c}.", "a {c} in the wild.")
WORLD_VERSION = 5
WORLDS = SYNTHETIC_WORLDS

# Domains: how a camera renders a scene. "clipart" (a shape on a plain backdrop, no
# camera) and "sketch" exist only in pretraining sets.
DOMAINS = ("day", "night", "dusk", "snow", "fog", "sketch", "clipart")
CAMERA_CONDITIONS = {"day": 0.6, "night": 0.1, "dusk": 0.1, "fog": 0.1, "snow": 0.1}  # the wild world's mix


@dataclass(frozen=True)
class View:
    """How one camera sees its subject: how large it appears, how the camera is tilted
    (a vertical squash of the subject), and how many branches hang in front of it."""

    size: tuple[float, float] = (0.22, 0.36)  # subject radius as a fraction of the frame
    squash: float = 1.0
    clutter: int = 0


@dataclass(frozen=True)
class Layout:
    """Where the splits of one world are photographed."""

    locations: dict[str, tuple[int, ...]]  # split -> camera locations
    conditions: dict[str, dict[str, float]]  # split -> domain -> probability
    home_bias: float  # eroding: chance that an image of class c is taken at its home location
    class_skew: float  # wild: Dirichlet concentration of each location's class frequencies (lower = more skewed)


_ID_WILD = tuple(range(0, 12))
LAYOUTS = {
    "wild": Layout(
        locations={"train": _ID_WILD, "id_val": _ID_WILD, "id_test": _ID_WILD,
                   "ood_val": tuple(range(100, 112)), "ood_test": tuple(range(200, 212))},
        conditions={split: CAMERA_CONDITIONS for split in ("train", "id_val", "id_test", "ood_val", "ood_test")},
        home_bias=0.0, class_skew=0.8),
    "eroding": Layout(  # the wild world's camera locations, so OOD comes from 12 of them too
        locations={"train": _ID_WILD, "id_val": _ID_WILD, "id_test": _ID_WILD,
                   "ood_val": tuple(range(100, 112)), "ood_test": tuple(range(200, 212))},
        conditions={"train": {"day": 1.0}, "id_val": {"day": 1.0}, "id_test": {"day": 1.0},
                    "ood_val": {"dusk": 1.0}, "ood_test": {"dusk": 1.0}},
        home_bias=0.5, class_skew=0.0),
}
OOD_SPLITS = ("ood_val", "ood_test")


def evaluation_locations(world: str) -> set[int]:
    """Every camera location that any split of ``world`` is photographed at."""
    return {loc for locs in LAYOUTS[world].locations.values() for loc in locs}


def location_view(world: str, location: int) -> View:
    """The viewpoint of a camera. The eroding world keeps one view everywhere. In the wild
    world every camera stands at its own distance from the trail; an ID camera is nearly
    level with at most one branch in front, an OOD camera (location >= 100) is tilted a
    little more and may have two. (When OOD cameras also stood farther off, that cost
    the demo's CE 0.12 more OOD test accuracy than it cost zero-shot, whose pretraining
    had seen near and far subjects.)"""
    if world == "eroding":
        return View()
    rng = np.random.default_rng([4099, location])
    centre = rng.uniform(0.27, 0.33)
    if location < 100:
        squash, clutter = rng.uniform(0.9, 1.0), int(rng.integers(0, 2))
    else:
        squash, clutter = rng.uniform(0.85, 0.97), int(rng.integers(0, 3))
    return View(size=(0.8 * centre, 1.2 * centre), squash=squash, clutter=clutter)


def class_frequencies(world: str, location: int, classes: int) -> np.ndarray:
    """How often each class passes a camera: [classes], summing to 1."""
    layout = LAYOUTS[world]
    if world == "eroding":  # class c's home is ID location c % 12; OOD locations see every class alike
        ids = LAYOUTS[world].locations["train"]
        if location not in ids:
            return np.full(classes, 1.0 / classes)
        here = np.array([layout.home_bias * (ids[c % len(ids)] == location) + (1 - layout.home_bias) / len(ids)
                         for c in range(classes)])
        return here / here.sum()
    rng = np.random.default_rng([6151, location])
    return rng.dirichlet(np.full(classes, layout.class_skew))


@dataclass(frozen=True)
class Scene:
    label: int
    domain: str
    location: int
    view: View = View()


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
    view = scene.view
    scale = 2  # draw at 2x and downsample: cheap anti-aliasing
    big = size * scale
    if scene.domain == "clipart":  # a plain light backdrop, no camera
        bg = np.ones((big, big, 3), dtype=np.float32) * rng.uniform(0.55, 1.0, 3)
    else:
        bg = _location_background(scene.location, big)
        bg = bg + rng.normal(0, 0.04, (1, 1, 3))  # per-shot exposure jitter
    r = rng.uniform(*view.size) * big
    cx, cy = rng.uniform(r, big - r), rng.uniform(r, big - r)
    angle = rng.uniform(-0.5, 0.5) if kind in ("heart", "arrow", "triangle") else rng.uniform(0, 2 * math.pi)
    if kind == "arrow":
        angle = rng.choice([0.0, math.pi]) + rng.uniform(-0.4, 0.4)
    hue = rng.uniform(0.15, 1.0, 3)
    canvas = Image.fromarray((np.clip(bg, 0, 1) * 255).astype(np.uint8))
    mask = Image.new("L", canvas.size, 0)  # where the subject is: the night camera's flash lights it
    ry = r * view.squash  # a tilted camera foreshortens the subject vertically
    for layer, fill in ((ImageDraw.Draw(canvas), tuple(int(v * 255) for v in hue)), (ImageDraw.Draw(mask), 255)):
        if kind == "circle":
            layer.ellipse([cx - r, cy - ry, cx + r, cy + ry], fill=fill)
        elif kind == "ring":
            layer.ellipse([cx - r, cy - ry, cx + r, cy + ry], outline=fill, width=max(2, int(0.3 * r)))
        else:
            points = _shape_polygon(kind, cx, cy, r, angle)
            if view.squash != 1.0:
                points = [(x, cy + (y - cy) * view.squash) for x, y in points]
            layer.polygon(points, fill=fill)
    if view.clutter:  # branches in front of the subject, in the colours of the scene
        draw = ImageDraw.Draw(canvas)
        for _ in range(view.clutter):
            x0, x1 = rng.uniform(-0.2, 1.2, 2) * big
            y0, y1 = rng.uniform(0, 1, 2) * big
            shade = tuple(int(v * 255) for v in np.clip(bg[int(y0) % big, int(x0) % big] * 0.6, 0, 1))
            draw.line([(x0, y0), (x1, y1)], fill=shade, width=max(2, int(big * rng.uniform(0.02, 0.05))))
    img = np.asarray(canvas.resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
    subject = np.asarray(mask.resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0  # [H, W]
    img = _apply_domain(img, subject, scene.domain, rng)
    out = Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))
    if scene.domain in ("night", "fog"):
        out = out.filter(ImageFilter.GaussianBlur(radius=0.6 if scene.domain == "night" else 1.0))
    return out


def _apply_domain(img: np.ndarray, subject: np.ndarray, domain: str, rng: np.random.Generator) -> np.ndarray:
    """[H, W, 3] in [0, 1] -> the same scene as this kind of camera sees it; ``subject`` is [H, W] in [0, 1]."""
    if domain in ("day", "clipart"):
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


def _scenes(world: str, split: str, classes: int, per_class: int, rng: np.random.Generator) -> list[Scene]:
    """``per_class`` scenes of every class: each at a location drawn by how often that
    location sees the class, in a condition drawn from the split's mix."""
    layout = LAYOUTS[world]
    locations = layout.locations[split]
    conditions = layout.conditions[split]
    names, p_cond = list(conditions), np.array(list(conditions.values()))
    freq = np.stack([class_frequencies(world, loc, classes) for loc in locations])  # [L, C]
    scenes = []
    for label in range(classes):
        if world == "eroding":  # the original draw: the home location with probability home_bias
            p_loc = None
        else:
            p_loc = freq[:, label] / freq[:, label].sum()
        for _ in range(per_class):
            domain = names[int(rng.choice(len(names), p=p_cond))] if len(names) > 1 else names[0]
            if p_loc is not None:
                loc = int(rng.choice(locations, p=p_loc))
            elif split in OOD_SPLITS:
                loc = int(rng.choice(locations))
            else:
                home = locations[label % len(locations)]
                loc = home if rng.random() < layout.home_bias else int(rng.choice(locations))
            scenes.append(Scene(label, domain, loc, location_view(world, loc)))
    return scenes


SPLIT_FILES = ("train", "id_val", "id_test", "ood_val", "ood_test")


def world_key(cfg: SyntheticConfig) -> str:
    return "world-v{}-{world}-s{seed}-c{classes}-t{train_per_class}-e{eval_per_class}-px{image_size}".format(
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
        for i, scene in enumerate(_scenes(cfg.world, split, cfg.classes, per_class, rng)):
            rel = f"images/{split}_{i:05d}.png"
            render(scene, cfg.image_size, np.random.default_rng([cfg.seed, split_id, i])).save(tmp / rel)
            templates = TEMPLATES if split == "train" else TEMPLATES[:1]
            for t in templates:
                rows.append(f"{rel}\t{t.format(c=names[scene.label])}\t{scene.label}\t{scene.location}\t{scene.domain}")
        (tmp / f"{split}.csv").write_text("filepath\ttitle\tlabel\tlocation\tdomain\n" + "\n".join(rows) + "\n")
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
