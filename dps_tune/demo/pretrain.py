"""The demo's pretrained tiny CLIPs: contrastive pretraining for each synthetic world.

This stands in for the web-scale pretraining that gives CLIP its zero-shot skill. Two
pretrained tags exist for each supported architecture, one per world of
:mod:`dps_tune.data.synthetic`:

* ``synthetic`` (for the default ``wild`` world) knows the shapes only loosely, as CLIP
  knows camera-trap species: it sees them in photos at camera locations that no
  evaluation split uses (mostly by day, some at night, dusk, in fog or snow), in sketches
  and clipart, near and far, but its captions call half of the shapes by other names
  (the web's common names against iWildCam's Latin labels), a fifth name no shape at all
  ("a photo of something.") and some name the wrong one. Zero-shot starts weak on ID and
  OOD alike, and fine-tuning on labelled ID photos teaches what it lacks.
* ``synthetic_eroding`` (for the ``eroding`` world) photographs every class in every
  camera domain, dusk and night infrared included, with captions that name the shape and
  often the domain (``"a photo of a star at dusk."``), so its zero-shot is already robust.

:func:`ensure_pretrained` builds the weights once, deterministically from
:class:`PretrainSettings`, and caches them under ``cache_dir() / "pretrained"``, keyed
by the settings, the architecture and :data:`~dps_tune.data.synthetic.WORLD_VERSION`.
:func:`register_tags` makes them open_clip pretrained tags, so
``create_model("tiny-rn", "synthetic")`` builds them on first use; the model layer
calls it the first time it looks up a tag (:data:`dps_tune.models.TAG_PROVIDERS`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from dps_tune import models
from dps_tune.config import Config, DataConfig, SyntheticConfig
from dps_tune.data import synthetic
from dps_tune.errors import ConfigError
from dps_tune.files import atomic_path, file_lock
from dps_tune.objectives import SPLITS
from dps_tune.optim import build_optimizer, lr_at, set_lr
from dps_tune.paths import cache_dir
from dps_tune.train import evaluate_start

logger = logging.getLogger(__name__)

TAG = "synthetic"
ERODING_TAG = "synthetic_eroding"
TAGS = {TAG: "wild", ERODING_TAG: "eroding"}  # pretrained tag -> the world it is built for


def tag_for(world: str) -> str:
    """The pretrained tag built for ``world``."""
    return next(tag for tag, w in TAGS.items() if w == world)


# Bump when the captions, the loss or the training loop change what a build produces.
PRETRAIN_VERSION = 3
# Pretraining locations start after every evaluation location of every world.
FIRST_LOCATION = 1 + max(loc for world in synthetic.WORLDS for loc in synthetic.evaluation_locations(world))

# Captions name the class in the words of the evaluation templates, and often the kind
# of camera (or drawing) that made the picture.
CLASS_CAPTIONS = synthetic.TEMPLATES
DOMAIN_CAPTIONS = {
    "day": "a daylight photo of a {c}.",
    "night": "a night photo of a {c}.",
    "dusk": "a photo of a {c} at dusk.",
    "snow": "a photo of a {c} in the snow.",
    "fog": "a foggy photo of a {c}.",
    "sketch": "a sketch of a {c}.",
    "clipart": "a drawing of a {c}.",
}
# Web captions that name no class at all.
GENERIC_CAPTIONS = ("a photo of something.", "an image.", "a picture taken outside.", "a drawing.")
# What each world's pretraining set shows (domain -> share).
WILD_DOMAINS = (("day", 0.45), ("night", 0.1), ("dusk", 0.1), ("fog", 0.1), ("snow", 0.05), ("sketch", 0.1),
                ("clipart", 0.1))
# The web calls half of the shapes by other names, as it calls camera-trap species by common
# names where iWildCam's labels are Latin ones ("tayassu pecari"): pretraining learns to see
# these shapes, but rarely hears the name the evaluation prompts use.
WEB_NAMES = (("circle", "ball"), ("square", "tile"), ("triangle", "wedge"), ("cross", "plus sign"),
             ("crescent", "moon"))
ERODING_DOMAINS = (("day", 0.5), ("night", 0.1), ("dusk", 0.1), ("snow", 0.1), ("fog", 0.1), ("sketch", 0.1))


@dataclass(frozen=True)
class PretrainSettings:
    """Everything a build depends on; the cache key is derived from it."""

    seed: int = 0
    classes: int = len(synthetic.CLASSNAMES)  # the first this many shape classes (tests use fewer)
    images: int = 6000  # pretraining set size
    locations: int = 160  # camera locations, numbered from FIRST_LOCATION
    render_size: int = 64  # rendered like the default world, then resized to the model input
    domains: tuple[tuple[str, float], ...] = WILD_DOMAINS  # (domain, share) of the images
    domain_caption_p: float = 0.3  # chance that a caption names the domain
    generic_caption_p: float = 0.2  # chance that a caption names no class at all
    wrong_caption_p: float = 0.05  # chance that a caption names another class
    web_names: tuple[tuple[str, str], ...] = WEB_NAMES  # (class, the name most captions use instead)
    class_name_p: float = 0.15  # chance that a caption of a renamed class uses the class's own name
    varied_views: bool = True  # subjects near and far, level and tilted, behind branches or not
    steps: int = 1500
    batch_size: int = 128
    lr: float = 2e-3
    wd: float = 0.1
    warmup_steps: int = 50


ERODING = PretrainSettings(domains=ERODING_DOMAINS, domain_caption_p=0.5, generic_caption_p=0.0,
                           wrong_caption_p=0.0, web_names=(), varied_views=False)
# Settings of each tag per architecture, each sized to build in about 1.5 minutes on 2
# CPU cores. tiny-rn is the demo's model: in that budget its convolutions learn the
# shapes far better than tiny-vit's 8-pixel patches.
DEMO_ARCH = "tiny-rn"
DEFAULT_SETTINGS: dict[str, dict[str, PretrainSettings]] = {
    TAG: {"tiny-rn": PretrainSettings(), "tiny-vit": PretrainSettings(lr=1e-3)},
    ERODING_TAG: {"tiny-rn": ERODING, "tiny-vit": dataclasses.replace(ERODING, lr=1e-3)},
}


def supported_architectures() -> tuple[str, ...]:
    return tuple(DEFAULT_SETTINGS[TAG])


def register_tags() -> None:
    """Register ``pretrained: synthetic`` and ``synthetic_eroding`` for every supported
    architecture (each built on first load)."""
    for tag in TAGS:
        for arch in supported_architectures():
            models.register_pretrained_tag(arch, tag, weights_path(arch, tag=tag),
                                           build=functools.partial(_build, arch, tag))


def _build(arch: str, tag: str) -> Path:
    # Looks ensure_pretrained up when the tag is loaded, not when it was registered: the
    # registration lives as long as the process, and must not keep whatever stood under
    # that name at the time (a test's stand-in, once, leaked into every later test).
    return ensure_pretrained(arch, tag=tag)


# ---------------------------------------------------------------------------- data


@dataclass(frozen=True)
class PretrainSet:
    images: torch.Tensor  # [N, 3, H, W] float32, normalised as the model's eval transform does
    caption_ids: torch.Tensor  # [N] index into captions
    captions: tuple[str, ...]  # unique captions
    labels: torch.Tensor  # [N]
    domains: torch.Tensor  # [N] index into synthetic.DOMAINS


def pretrain_scenes(settings: PretrainSettings) -> tuple[list[synthetic.Scene], list[str]]:
    """The scenes of the pretraining set and one caption per scene, from ``settings.seed``."""
    rng = np.random.default_rng([settings.seed, 0x5EED])
    n = settings.images
    labels = rng.integers(settings.classes, size=n)
    names = [d for d, _ in settings.domains]
    shares = np.array([p for _, p in settings.domains], dtype=float)
    domains = rng.choice(len(names), size=n, p=shares / shares.sum())
    locations = FIRST_LOCATION + rng.integers(settings.locations, size=n)
    kind = rng.random(n)  # which kind of caption
    pick = rng.random(n)  # which caption of that kind
    other = rng.integers(1, max(2, settings.classes), size=n)  # offset to a wrong class
    sizes = rng.uniform(0.22, 0.32, size=n)  # the centre of a subject's size range
    squash = rng.uniform(0.85, 1.0, size=n)
    clutter = rng.integers(0, 2, size=n)
    own_name = rng.random(n) < settings.class_name_p
    web = dict(settings.web_names)
    named_domain = settings.domain_caption_p
    generic = named_domain + settings.generic_caption_p
    wrong = generic + settings.wrong_caption_p
    scenes, captions = [], []
    for i, (label, dom, loc, k, u, off) in enumerate(zip(labels, domains, locations, kind, pick, other)):
        domain = names[dom]
        view = synthetic.View()
        if settings.varied_views:
            view = synthetic.View((0.8 * sizes[i], 1.2 * sizes[i]), float(squash[i]), int(clutter[i]))
        said = int(label)
        if k < named_domain:
            template = DOMAIN_CAPTIONS[domain]
        elif k < generic:
            template = GENERIC_CAPTIONS[int(u * len(GENERIC_CAPTIONS))]
        else:
            template = CLASS_CAPTIONS[int(u * len(CLASS_CAPTIONS))]
            if k < wrong:
                said = (said + int(off)) % settings.classes
        name = synthetic.CLASSNAMES[said]
        if name in web and not own_name[i]:
            name = web[name]
        scenes.append(synthetic.Scene(int(label), domain, int(loc), view))
        captions.append(template.format(c=name))
    return scenes, captions


def build_pretrain_set(settings: PretrainSettings, transform: Callable[[Image.Image], torch.Tensor]) -> PretrainSet:
    """Render every scene and preprocess it with ``transform`` (the model's eval transform)."""
    scenes, captions = pretrain_scenes(settings)
    unique = tuple(sorted(set(captions)))
    index = {c: i for i, c in enumerate(unique)}
    images = [transform(synthetic.render(s, settings.render_size, np.random.default_rng([settings.seed, 0x5EED, i])))
              for i, s in enumerate(scenes)]
    return PretrainSet(
        images=torch.stack(images),
        caption_ids=torch.tensor([index[c] for c in captions]),
        captions=unique,
        labels=torch.tensor([s.label for s in scenes]),
        domains=torch.tensor([synthetic.DOMAINS.index(s.domain) for s in scenes]),
    )


# -------------------------------------------------------------------------- training


def caption_contrastive_loss(model: nn.Module, images: torch.Tensor, caption_ids: torch.Tensor,
                             caption_tokens: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE, with each distinct caption of the batch encoded once.

    The pretraining captions repeat within a batch (there are 80 distinct ones), so
    plain InfoNCE would push apart an image and its own caption's twin. Here every
    image is classified among the batch's distinct captions, and every caption among
    the batch's images with a target spread evenly over the images that carry it.
    """
    unique, inverse = torch.unique(caption_ids, return_inverse=True)  # [U], [B]
    img = model.encode_image(images, normalize=True)  # [B, D]
    txt = model.encode_text(caption_tokens[unique], normalize=True)  # [U, D]
    logits = (model.logit_scale.exp() * img @ txt.T).float()  # [B, U]
    positives = F.one_hot(inverse, unique.numel()).T.float()  # [U, B]
    image_to_text = F.cross_entropy(logits, inverse)
    text_to_image = F.cross_entropy(logits.T, positives / positives.sum(1, keepdim=True))
    return (image_to_text + text_to_image) / 2


def _batches(n: int, batch_size: int, steps: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """``steps`` batches of indices, walking through fresh permutations of ``range(n)``."""
    done = 0
    while done < steps:
        order = torch.randperm(n, generator=gen)
        for start in range(0, n - batch_size + 1, batch_size):
            if done == steps:
                return
            yield order[start:start + batch_size]
            done += 1


@contextlib.contextmanager
def _compact_token_table(model: nn.Module, tokens: torch.Tensor) -> Iterator[torch.Tensor]:
    """Train only the token-embedding rows the captions use; yields the re-numbered tokens.

    The captions use a few dozen of the 49,408 token ids, yet AdamW would update the
    whole table every step: a fifth of a tiny model's step. Inside this context the
    model embeds through a table of the used rows alone, written back on exit. The
    renumbering keeps the order of ids, so the end-of-text token, which open_clip
    pools by ``argmax`` over the ids, stays the largest.
    """
    if getattr(model, "text_pool_type", None) != "argmax" or not isinstance(
            getattr(model, "token_embedding", None), nn.Embedding):
        yield tokens
        return
    full = model.token_embedding
    used = torch.unique(tokens)  # [V'], sorted
    small = nn.Embedding(used.numel(), full.embedding_dim)
    with torch.no_grad():
        small.weight.copy_(full.weight[used])
    model.token_embedding = small
    try:
        yield torch.searchsorted(used, tokens)  # [U, L], ids into the small table
    finally:
        with torch.no_grad():
            full.weight[used] = small.weight
        model.token_embedding = full


def pretrain_model(model: nn.Module, data: PretrainSet, tokenizer: Callable[[list[str]], torch.Tensor],
                   settings: PretrainSettings) -> list[float]:
    """Train ``model`` in place on ``data``; returns the mean loss of each tenth of the run."""
    gen = torch.Generator().manual_seed(settings.seed)
    batch_size = min(settings.batch_size, len(data.images))
    log_every = max(1, settings.steps // 10)
    model.train()
    losses, running = [], []
    with _compact_token_table(model, tokenizer(list(data.captions))) as tokens:  # [U, L]
        opt = build_optimizer(model, lr=settings.lr, wd=settings.wd, betas=(0.9, 0.98), eps=1e-6, fused=False)
        for step, idx in enumerate(_batches(len(data.images), batch_size, settings.steps, gen)):
            set_lr(opt, lr_at(step, settings.lr, settings.warmup_steps, settings.steps))
            images = data.images[idx]  # [B, 3, H, W]
            # Horizontal flips are label-preserving for every shape and double the views.
            flip = torch.rand(len(idx), generator=gen) < 0.5
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
            loss = caption_contrastive_loss(model, images, data.caption_ids[idx], tokens)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():  # CLIP's cap on the learned temperature: exp(scale) <= 100
                model.logit_scale.clamp_(0, math.log(100))
            running.append(loss.item())
            if len(running) == log_every or step == settings.steps - 1:
                losses.append(float(np.mean(running)))
                logger.info("pretrain step %d/%d: loss %.4f", step + 1, settings.steps, losses[-1])
                running = []
    model.eval()
    return losses


# ----------------------------------------------------------------------------- cache


def settings_key(arch: str, settings: PretrainSettings) -> str:
    """A short hash of everything the weights depend on."""
    import open_clip

    blob = json.dumps({"arch": arch, "model_cfg": open_clip.get_model_config(arch),
                       "settings": dataclasses.asdict(settings), "world": synthetic.WORLD_VERSION,
                       "pretrain": PRETRAIN_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def weights_path(arch: str = DEMO_ARCH, settings: PretrainSettings | None = None, *, tag: str = TAG) -> Path:
    """Where the weights of ``(arch, settings)`` live in the cache (they may not exist yet)."""
    settings = settings or default_settings(arch, tag)
    return cache_dir() / "pretrained" / f"{arch}-{tag}-{settings_key(arch, settings)}.safetensors"


def default_settings(arch: str, tag: str = TAG) -> PretrainSettings:
    if tag not in DEFAULT_SETTINGS:
        raise ConfigError(f"pretrained {tag!r}: not a synthetic tag; use one of {', '.join(DEFAULT_SETTINGS)}")
    if arch not in DEFAULT_SETTINGS[tag]:
        raise ConfigError(f"pretrained {tag!r}: only available for {', '.join(DEFAULT_SETTINGS[tag])}, not {arch}")
    return DEFAULT_SETTINGS[tag][arch]


def _check_settings(settings: PretrainSettings) -> None:
    checks = (
        ("classes", 2 <= settings.classes <= len(synthetic.CLASSNAMES), f"between 2 and {len(synthetic.CLASSNAMES)}"),
        ("images", settings.images >= 1, ">= 1"),
        ("locations", settings.locations >= 1, ">= 1"),
        ("render_size", settings.render_size >= 16, ">= 16"),
        ("domains", bool(settings.domains) and all(d in synthetic.DOMAINS and p >= 0 for d, p in settings.domains)
         and sum(p for _, p in settings.domains) > 0, f"(domain, share) pairs over {', '.join(synthetic.DOMAINS)}"),
        ("domain_caption_p", 0 <= settings.domain_caption_p <= 1, "in [0, 1]"),
        ("generic_caption_p", 0 <= settings.generic_caption_p <= 1, "in [0, 1]"),
        ("class_name_p", 0 <= settings.class_name_p <= 1, "in [0, 1]"),
        ("web_names", all(c in synthetic.CLASSNAMES for c, _ in settings.web_names),
         f"(class, web name) pairs over {', '.join(synthetic.CLASSNAMES)}"),
        ("wrong_caption_p", 0 <= settings.wrong_caption_p <= 1
         and settings.domain_caption_p + settings.generic_caption_p + settings.wrong_caption_p <= 1,
         "in [0, 1], and the three caption shares at most 1 together"),
        ("steps", settings.steps >= 1, ">= 1"),
        ("batch_size", settings.batch_size >= 2, ">= 2"),
        ("lr", settings.lr > 0, "> 0"),
        ("wd", settings.wd >= 0, ">= 0"),
        ("warmup_steps", settings.warmup_steps >= 0, ">= 0"),
    )
    for name, ok, allowed in checks:
        if not ok:
            raise ConfigError(f"pretrain settings {name} = {getattr(settings, name)!r}: must be {allowed}")


# The sums inside a CPU matmul or convolution are split across threads, so their rounding
# depends on the thread count, and 1,500 steps of training amplify it: the eroding build on 1
# thread gave zero-shot 0.704 ID test accuracy where 2 threads gave 0.752. Every build uses 2,
# so a machine of any size builds the weights that the README's figures came from.
BUILD_THREADS = 2


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def ensure_pretrained(arch: str = DEMO_ARCH, settings: PretrainSettings | None = None, *,
                      tag: str = TAG, force: bool = False) -> Path:
    """The cached weights file of ``arch`` pretrained with ``settings``, built if missing.

    The build is deterministic from ``settings.seed`` and runs on :data:`BUILD_THREADS`
    CPU threads whatever the machine has. The file is written to a temporary
    name and renamed into place under a lock, so concurrent callers build it once and
    never see a partial file. ``force`` rebuilds it even if it exists.
    """
    from safetensors.torch import save_file

    settings = settings or default_settings(arch, tag)
    _check_settings(settings)
    path = weights_path(arch, settings, tag=tag)
    if path.is_file() and not force:
        return path
    with file_lock(path.with_name(path.name + ".lock")):
        if path.is_file() and not force:  # another process built it while we waited
            return path
        logger.info("building the pretrained %s (%s) at %s; this happens once", arch, tag, path)
        start = time.perf_counter()
        cpu_start = time.process_time()
        # The caller's RNG stream must not depend on whether the file was already cached.
        with torch.random.fork_rng(devices=[]), _torch_threads(BUILD_THREADS):
            torch.manual_seed(settings.seed)
            model = models.create_model(arch, "none")
            data = build_pretrain_set(settings, models.eval_transform(model))
            render_s = time.perf_counter() - start
            losses = pretrain_model(model, data, models.get_tokenizer(arch), settings)
        state = models.plain_state_dict(model)
        meta = {"arch": arch, "tag": tag, "settings": json.dumps(dataclasses.asdict(settings)),
                "world_version": str(synthetic.WORLD_VERSION), "final_loss": f"{losses[-1]:.4f}"}
        with atomic_path(path) as tmp:
            save_file(state, str(tmp), metadata=meta)
        logger.info("built the pretrained %s in %.1f s (%.1f s rendering %d images, %d steps; %.1f s CPU time); "
                    "final loss %.4f", arch, time.perf_counter() - start, render_s, settings.images,
                    settings.steps, time.process_time() - cpu_start, losses[-1])
    return path


# ------------------------------------------------------------------------- zero-shot


def zero_shot_report(arch: str = DEMO_ARCH, pretrained: str = TAG, world: SyntheticConfig | None = None,
                     splits: Sequence[str] = SPLITS) -> dict[str, float]:
    """Zero-shot ``{split}_acc`` and ``{split}_f1`` of ``arch``/``pretrained`` on the synthetic world.

    ``world`` defaults to the demo's world (:class:`SyntheticConfig` defaults); its
    prompt templates build the zero-shot head, as in fine-tuning's evaluation.
    """
    data = DataConfig(dataset="synthetic", synthetic=world or SyntheticConfig(), eval_splits=tuple(splits), workers=0)
    metrics = evaluate_start(Config(model=arch, pretrained=pretrained, data=data, train=dataclasses.replace(
        Config().train, device="cpu", precision="fp32")))
    for s in splits:
        logger.info("zero-shot %s/%s on %s: acc %.3f, macro-F1 %.3f", arch, pretrained, s, metrics[f"{s}_acc"],
                    metrics[f"{s}_f1"])
    return metrics
