"""The demo's pretrained tiny CLIP: contrastive pretraining on the synthetic world.

This stands in for the web-scale pretraining that gives CLIP its zero-shot skill and
its robustness. The pretraining set photographs every class in every domain of
:data:`dps_tune.data.synthetic.DOMAINS` (daylight, night infrared, dusk, snow, fog, sketch)
at many camera locations, none of which is an ID or OOD evaluation location, and
captions each image with its class name and often its domain
(``"a night photo of a star."``).

:func:`ensure_pretrained` builds the weights once, deterministically from
:class:`PretrainSettings`, and caches them under ``cache_dir() / "pretrained"``, keyed
by the settings, the architecture and :data:`~dps_tune.data.synthetic.WORLD_VERSION`.
:func:`register_tags` makes them the open_clip pretrained tag ``synthetic``, so
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
from dps_tune.config import SPLITS, Config, DataConfig, SyntheticConfig
from dps_tune.data import synthetic
from dps_tune.errors import ConfigError
from dps_tune.files import atomic_path, file_lock
from dps_tune.optim import build_optimizer, lr_at, set_lr
from dps_tune.paths import cache_dir
from dps_tune.train import evaluate_start

logger = logging.getLogger(__name__)

TAG = "synthetic"
# Bump when the captions, the loss or the training loop change what a build produces.
PRETRAIN_VERSION = 1
# Pretraining locations start after every ID and OOD evaluation location.
FIRST_LOCATION = 1 + max(*synthetic.ID_LOCATIONS, *(loc for locs in synthetic.OOD_LOCATIONS.values() for loc in locs))

# Captions name the class in the words of the evaluation templates, and often the kind
# of camera that took the picture.
GENERIC_CAPTIONS = synthetic.TEMPLATES
DOMAIN_CAPTIONS = {
    "day": "a daylight photo of a {c}.",
    "night": "a night photo of a {c}.",
    "dusk": "a photo of a {c} at dusk.",
    "snow": "a photo of a {c} in the snow.",
    "fog": "a foggy photo of a {c}.",
    "sketch": "a sketch of a {c}.",
}


@dataclass(frozen=True)
class PretrainSettings:
    """Everything a build depends on; the cache key is derived from it."""

    seed: int = 0
    classes: int = len(synthetic.CLASSNAMES)  # the first this many shape classes (tests use fewer)
    images: int = 6000  # pretraining set size
    locations: int = 160  # camera locations, numbered from FIRST_LOCATION
    render_size: int = 64  # rendered like the default world, then resized to the model input
    day_share: float = 0.5  # share of daylight photos (as on the web); other domains split the rest
    domain_caption_p: float = 0.5  # chance that a caption names the domain
    steps: int = 1500
    batch_size: int = 128
    lr: float = 2e-3
    wd: float = 0.1
    warmup_steps: int = 50


# Settings of the ``synthetic`` tag per architecture, each sized to build in about
# 1.5 minutes on 2 CPU cores. tiny-rn is the demo's model: in that budget its
# convolutions learn the shapes far better than tiny-vit's 8-pixel patches.
DEMO_ARCH = "tiny-rn"
DEFAULT_SETTINGS: dict[str, PretrainSettings] = {
    "tiny-rn": PretrainSettings(),
    "tiny-vit": PretrainSettings(lr=1e-3),
}


def supported_architectures() -> tuple[str, ...]:
    return tuple(DEFAULT_SETTINGS)


def register_tags() -> None:
    """Register ``pretrained: synthetic`` for every supported architecture (built on first load)."""
    for arch in supported_architectures():
        models.register_pretrained_tag(arch, TAG, weights_path(arch),
                                       build=functools.partial(ensure_pretrained, arch))


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
    others = (1.0 - settings.day_share) / (len(synthetic.DOMAINS) - 1)
    p_domain = [settings.day_share if d == "day" else others for d in synthetic.DOMAINS]
    domains = rng.choice(len(synthetic.DOMAINS), size=n, p=p_domain)
    locations = FIRST_LOCATION + rng.integers(settings.locations, size=n)
    named = rng.random(n) < settings.domain_caption_p
    pick = rng.random(n)
    scenes, captions = [], []
    for label, dom, loc, nd, u in zip(labels, domains, locations, named, pick):
        domain = synthetic.DOMAINS[dom]
        template = DOMAIN_CAPTIONS[domain] if nd else GENERIC_CAPTIONS[int(u * len(GENERIC_CAPTIONS))]
        scenes.append(synthetic.Scene(int(label), domain, int(loc)))
        captions.append(template.format(c=synthetic.CLASSNAMES[label]))
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


def weights_path(arch: str = DEMO_ARCH, settings: PretrainSettings | None = None) -> Path:
    """Where the weights of ``(arch, settings)`` live in the cache (they may not exist yet)."""
    settings = settings or default_settings(arch)
    return cache_dir() / "pretrained" / f"{arch}-{TAG}-{settings_key(arch, settings)}.safetensors"


def default_settings(arch: str) -> PretrainSettings:
    if arch not in DEFAULT_SETTINGS:
        raise ConfigError(f"pretrained {TAG!r}: only available for {', '.join(DEFAULT_SETTINGS)}, not {arch}")
    return DEFAULT_SETTINGS[arch]


def _check_settings(settings: PretrainSettings) -> None:
    checks = (
        ("classes", 2 <= settings.classes <= len(synthetic.CLASSNAMES), f"between 2 and {len(synthetic.CLASSNAMES)}"),
        ("images", settings.images >= 1, ">= 1"),
        ("locations", settings.locations >= 1, ">= 1"),
        ("render_size", settings.render_size >= 16, ">= 16"),
        ("day_share", 0 <= settings.day_share <= 1, "in [0, 1]"),
        ("domain_caption_p", 0 <= settings.domain_caption_p <= 1, "in [0, 1]"),
        ("steps", settings.steps >= 1, ">= 1"),
        ("batch_size", settings.batch_size >= 2, ">= 2"),
        ("lr", settings.lr > 0, "> 0"),
        ("wd", settings.wd >= 0, ">= 0"),
        ("warmup_steps", settings.warmup_steps >= 0, ">= 0"),
    )
    for name, ok, allowed in checks:
        if not ok:
            raise ConfigError(f"pretrain settings {name} = {getattr(settings, name)!r}: must be {allowed}")


def ensure_pretrained(arch: str = DEMO_ARCH, settings: PretrainSettings | None = None, *,
                      force: bool = False) -> Path:
    """The cached weights file of ``arch`` pretrained with ``settings``, built if missing.

    The build is deterministic from ``settings.seed``. The file is written to a temporary
    name and renamed into place under a lock, so concurrent callers build it once and
    never see a partial file. ``force`` rebuilds it even if it exists.
    """
    from safetensors.torch import save_file

    settings = settings or default_settings(arch)
    _check_settings(settings)
    path = weights_path(arch, settings)
    if path.is_file() and not force:
        return path
    with file_lock(path.with_name(path.name + ".lock")):
        if path.is_file() and not force:  # another process built it while we waited
            return path
        logger.info("building the pretrained %s (%s) at %s; this happens once", arch, TAG, path)
        start = time.perf_counter()
        cpu_start = time.process_time()
        # The caller's RNG stream must not depend on whether the file was already cached.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed)
            model = models.create_model(arch, "none")
            data = build_pretrain_set(settings, models.eval_transform(model))
            render_s = time.perf_counter() - start
            losses = pretrain_model(model, data, models.get_tokenizer(arch), settings)
        state = models.plain_state_dict(model)
        meta = {"arch": arch, "tag": TAG, "settings": json.dumps(dataclasses.asdict(settings)),
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
