"""Training augmentation and evaluation preprocessing for whole batches, on the trial's device.

Input is a batch of uint8 images from the prepared cache (:mod:`dps_tune.data.cache_reader`),
``[B, S, S, 3]``, already on the device. Training draws one RandomResizedCrop box per
sample (scale 0.9–1.0, the paper's setting) with :func:`dps_tune.data.sampling.crop_params`
from a generator seeded by the sample's seed, exactly as the JPEG path does, so a
sample's crop is a function of (run seed, epoch, position) and resumed runs stay exact.

Resampling is antialiased bicubic (or bilinear), the filter PIL and torchvision use:

* on the CPU, one ``F.interpolate(uint8, antialias=True)`` per sample: torch's
  PIL-compatible uint8 kernel, the fastest path there;
* on any other device, two batched matmuls with per-sample resampling matrices
  ``[B, out, S]``, so every 64 images cost a few kernels however many crop sizes they have.

Both give the same pixels up to uint8 rounding; results are rounded to uint8 levels
like PIL's, then normalised with the model's mean and std.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from open_clip.transform import PreprocessCfg

from dps_tune.data.sampling import TRAIN_CROP_RATIO, TRAIN_CROP_SCALE, crop_params

logger = logging.getLogger(__name__)

INTERPOLATIONS = ("bicubic", "bilinear")
BACKENDS = ("auto", "per_sample", "matmul")
_MATMUL_CHUNK = 64


def crop_boxes(height: int, width: int, seeds: Sequence[int], scale: tuple[float, float] = TRAIN_CROP_SCALE,
               ratio: tuple[float, float] = TRAIN_CROP_RATIO) -> torch.Tensor:
    """RandomResizedCrop boxes ``(top, left, h, w)`` for a batch: [B, 4] int64 on the CPU.

    Box ``i`` is ``crop_params(height, width, Generator().manual_seed(seeds[i]))``, the
    same box the JPEG path draws for that sample on an image of this size.
    """
    boxes = [crop_params(height, width, torch.Generator().manual_seed(int(s)), scale, ratio) for s in seeds]
    return torch.tensor(boxes, dtype=torch.int64).reshape(len(boxes), 4)


def full_boxes(batch: int, height: int, width: int) -> torch.Tensor:
    """Boxes covering the whole image: [B, 4]."""
    return torch.tensor([[0, 0, height, width]], dtype=torch.int64).expand(batch, 4).contiguous()


def _kernel(x: torch.Tensor, interpolation: str) -> torch.Tensor:
    """PIL's resampling filters: triangle, or Keys cubic with a = -0.5."""
    x = x.abs()
    if interpolation == "bilinear":
        return (1.0 - x).clamp(min=0.0)
    a = -0.5
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


def resample_matrices(start: torch.Tensor, length: torch.Tensor, in_size: int, out_size: int,
                      interpolation: str = "bicubic") -> torch.Tensor:
    """Per-sample 1-D resampling weights [B, out_size, in_size] from the span ``[start, start + length)``.

    Row ``i`` of sample ``b`` holds the weights of output pixel ``i``: PIL's antialiased
    filter (support widened by the shrink factor), limited to the span and normalised
    to sum 1. ``start`` and ``length`` are [B] integer tensors on the target device.
    """
    start, length = start.to(torch.float32), length.to(torch.float32)
    scale = length / out_size  # [B] input pixels per output pixel
    widen = scale.clamp(min=1.0)  # antialiasing: stretch the filter when shrinking
    out_pos = torch.arange(out_size, device=start.device, dtype=torch.float32) + 0.5
    center = start[:, None] + out_pos[None, :] * scale[:, None]  # [B, O] in input coordinates
    src = torch.arange(in_size, device=start.device, dtype=torch.float32) + 0.5  # [I] pixel centres
    weights = _kernel((src[None, None, :] - center[:, :, None]) / widen[:, None, None], interpolation)  # [B, O, I]
    inside = (src[None, :] > start[:, None]) & (src[None, :] < (start + length)[:, None])  # [B, I]
    # The kernels are zero beyond their support (2 or 1 widened input pixels), so no window is needed.
    weights = weights * inside[:, None, :]
    return weights / weights.sum(dim=-1, keepdim=True)


def resized_crops(images: torch.Tensor, boxes: torch.Tensor, size: int, interpolation: str = "bicubic",
                  backend: str = "auto") -> torch.Tensor:
    """Crop ``boxes`` out of ``images`` [B, H, W, 3] uint8 and resize each to ``size``.

    Returns [B, 3, size, size] on the images' device, with values on the uint8 grid
    (uint8 from the per-sample backend, float32 from the matmul backend).
    ``backend="auto"`` picks ``per_sample`` on the CPU and ``matmul`` elsewhere.
    """
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation {interpolation!r}: must be one of {', '.join(INTERPOLATIONS)}")
    if backend == "auto":
        backend = "per_sample" if images.device.type == "cpu" else "matmul"
    if backend == "per_sample":
        return _resize_each(images, boxes, size, interpolation)
    if backend == "matmul":
        return _resize_matmul(images, boxes, size, interpolation)
    raise ValueError(f"backend {backend!r}: must be one of {', '.join(BACKENDS)}")


def _resize_each(images: torch.Tensor, boxes: torch.Tensor, size: int, interpolation: str) -> torch.Tensor:
    chw = images.permute(0, 3, 1, 2)  # [B, 3, H, W] view with channels-last strides: the fast uint8 kernel
    uint8_ok = images.device.type == "cpu"  # other devices have no uint8 antialias kernel
    out = torch.empty((images.shape[0], 3, size, size), dtype=torch.uint8 if uint8_ok else torch.float32,
                      device=images.device)
    for i, (top, left, h, w) in enumerate(boxes.tolist()):
        crop = chw[i:i + 1, :, top:top + h, left:left + w]  # [1, 3, h, w]
        if (h, w) == (size, size):
            out[i:i + 1] = crop
            continue
        if not uint8_ok:
            crop = crop.float()
        resized = F.interpolate(crop, size=(size, size), mode=interpolation, antialias=True, align_corners=False)
        out[i:i + 1] = resized if uint8_ok else resized.round().clamp(0, 255)
    return out


def _resize_matmul(images: torch.Tensor, boxes: torch.Tensor, size: int, interpolation: str) -> torch.Tensor:
    batch, height, width, _ = images.shape
    boxes = boxes.to(images.device)
    out = torch.empty((batch, 3, size, size), dtype=torch.float32, device=images.device)
    # Full fp32: TF32 would move pixels by a fraction of a uint8 level.
    with _no_tf32():
        # Chunks bound the float temporaries (about 125 MB per 64 images at 256 px),
        # which matters for fractional-GPU trials; each chunk is still a few kernels.
        for lo in range(0, batch, _MATMUL_CHUNK):
            hi = min(batch, lo + _MATMUL_CHUNK)
            rows = resample_matrices(boxes[lo:hi, 0], boxes[lo:hi, 2], height, size, interpolation)  # [b, O, H]
            cols = resample_matrices(boxes[lo:hi, 1], boxes[lo:hi, 3], width, size, interpolation)  # [b, O, W]
            pixels = images[lo:hi].permute(0, 3, 1, 2).float()  # [b, 3, H, W]
            tall = torch.matmul(rows[:, None], pixels)  # [b, 3, O, W]
            torch.matmul(tall, cols[:, None].transpose(-1, -2), out=out[lo:hi])  # [b, 3, O, O]
    return out.round_().clamp_(0, 255)


@contextlib.contextmanager
def _no_tf32() -> Iterator[None]:
    """TF32 matmuls off inside the block (the trainer may have turned them on globally)."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def normalize(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(pixels / 255 - mean) / std`` per channel: [B, 3, H, W] on the uint8 scale -> float32."""
    m = torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)
    scale = (1.0 / (255.0 * s)).to(pixels.device, torch.float32)
    shift = (m / s).to(pixels.device, torch.float32)
    # In place: one new float tensor per batch instead of four temporaries.
    out = pixels.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    return out.mul_(scale).sub_(shift)


class TrainAugment:
    """RandomResizedCrop(scale 0.9–1.0) to ``size``, then the model's normalisation, for a batch.

    ``augment(images, seeds)`` takes uint8 [B, S, S, 3] on any device and one seed per
    sample (:func:`dps_tune.data.sampling.sample_seed`); returns float32 [B, 3, size, size] there.
    """

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float], interpolation: str = "bicubic",
                 backend: str = "auto"):
        self.size, self.mean, self.std = size, tuple(mean), tuple(std)
        self.interpolation, self.backend = interpolation, backend

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        _, height, width, _ = images.shape
        boxes = crop_boxes(height, width, seeds)  # [B, 4]
        pixels = resized_crops(images, boxes, self.size, self.interpolation, self.backend)
        return normalize(pixels, self.mean, self.std)


class EvalTransform:
    """The model's evaluation preprocessing on cached squares: resize to ``size``, normalise.

    The cache holds the centre square of each image, so this equals open_clip's
    ``Resize(shortest side) + CenterCrop`` up to resampling. ``transform(images)`` maps
    uint8 [B, S, S, 3] to float32 [B, 3, size, size] on the images' device.
    """

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float], interpolation: str = "bicubic",
                 backend: str = "auto"):
        self.size, self.mean, self.std = size, tuple(mean), tuple(std)
        self.interpolation, self.backend = interpolation, backend

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        batch, height, width, _ = images.shape
        pixels = resized_crops(images, full_boxes(batch, height, width), self.size, self.interpolation, self.backend)
        return normalize(pixels, self.mean, self.std)


def for_preprocess(pre: PreprocessCfg) -> tuple[TrainAugment, EvalTransform]:
    """The training augmentation and evaluation transform that match a model's open_clip preprocessing."""
    size = pre.size if isinstance(pre.size, int) else pre.size[0]
    interpolation = pre.interpolation if pre.interpolation in INTERPOLATIONS else "bicubic"
    if pre.resize_mode != "shortest":
        logger.warning("the model's eval transform uses resize_mode %r; the image cache holds centre squares, "
                       "so evaluation from the cache resizes the square instead", pre.resize_mode)
    # Training is bicubic whatever the model's eval interpolation, as in the paper's pipeline.
    return (TrainAugment(size, pre.mean, pre.std, "bicubic"),
            EvalTransform(size, pre.mean, pre.std, interpolation))
