"""open_clip models: tiny architectures, loading through open_clip, state-dict naming.

Every model is built by ``open_clip.create_model``; weights come from an open_clip
pretrained tag, a local weights file, or random initialisation (``none``).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
from pathlib import Path
from typing import Callable, Mapping

import open_clip
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from torch import nn

from dps_tune.errors import CheckpointError, first_line
from dps_tune.layout import MODEL_FILE, read_safetensors_header

logger = logging.getLogger(__name__)

_CONFIG_DIR = Path(__file__).with_name("model_configs")
# Wrapper prefixes added by DataParallel/DistributedDataParallel and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")

open_clip.add_model_config(_CONFIG_DIR)
# Tags whose weights file is built on first use: (arch, tag) -> builder returning the file.
_TAG_BUILDERS: dict[tuple[str, str], Callable[[], Path]] = {}

# Modules that register pretrained tags of their own, as "module:function". They are
# imported the first time a tag is looked up, so this model layer never imports the
# application code that builds those weights (the demo's ``synthetic`` tag); a Ray worker,
# which imports only the trainable, resolves the tag all the same. tests/test_architecture.py
# resolves these strings: each must name a function above the core, declared there.
TAG_PROVIDERS: list[str] = ["dps_tune.demo.pretrain:register_tags"]
_providers_loaded = False


def _load_tag_providers() -> None:
    global _providers_loaded
    if _providers_loaded:
        return
    _providers_loaded = True
    for spec in TAG_PROVIDERS:
        module, func = spec.split(":")
        getattr(importlib.import_module(module), func)()


def list_architectures() -> list[str]:
    return open_clip.list_models()


def list_pretrained_tags(arch: str) -> list[str]:
    _load_tag_providers()
    return open_clip.list_pretrained_tags_by_model(arch)


def tag_key(tag: str) -> str:
    """A pretrained tag as open_clip looks it up: lower case, ``-`` read as ``_``.

    open_clip normalises the tag it is asked for this way (``get_pretrained_cfg``), so a tag
    registered under another spelling would never be found; ours are stored and checked by
    this key, and any spelling open_clip accepts works here too."""
    return tag.lower().replace("-", "_")


def register_pretrained_tag(arch: str, tag: str, path: str | os.PathLike, *,
                            build: Callable[[], Path] | None = None, **preprocess: object) -> None:
    """Make ``pretrained=tag`` resolve to a local file through open_clip's tag lookup.

    With ``build``, :func:`create_model` calls it before loading the tag and uses the
    file it returns (building it first if needed) instead of ``path``.
    """
    from open_clip import pretrained as oc_pretrained

    if build is not None:
        _TAG_BUILDERS[(arch, tag_key(tag))] = build

    cfg = {
        "file": str(path),
        "mean": open_clip.OPENAI_DATASET_MEAN,
        "std": open_clip.OPENAI_DATASET_STD,
        "interpolation": "bicubic",
        "resize_mode": "shortest",
        **preprocess,
    }
    oc_pretrained._PRETRAINED.setdefault(arch, {})[tag_key(tag)] = cfg


def uses_quick_gelu(arch: str, pretrained: str) -> bool:
    """Whether the network of ``(arch, pretrained)`` uses QuickGELU (OpenAI's weights do)."""
    if pretrained not in ("none", "") and not Path(pretrained).is_file():
        _load_tag_providers()
        if open_clip.get_pretrained_cfg(arch, pretrained).get("quick_gelu", False):
            return True
    return bool((open_clip.get_model_config(arch) or {}).get("quick_gelu", False))


def architecture_name(arch: str, pretrained: str) -> str:
    """The open_clip model name that rebuilds the network of ``(arch, pretrained)`` exactly.

    ``ViT-B-16`` with OpenAI weights is ``ViT-B-16-quickgelu``: open_clip's plain
    ``ViT-B-16`` uses standard GELU, and loading fine-tuned OpenAI weights into it
    changes every activation without a warning.
    """
    if uses_quick_gelu(arch, pretrained) and not (open_clip.get_model_config(arch) or {}).get("quick_gelu"):
        return f"{arch}-quickgelu"
    return arch


def architecture_config(arch: str, pretrained: str) -> dict:
    """The open_clip model config of :func:`architecture_name` (for ``open_clip.add_model_config``)."""
    cfg = dict(open_clip.get_model_config(arch) or {})
    if uses_quick_gelu(arch, pretrained):
        cfg["quick_gelu"] = True
    return cfg


def strip_wrapper_prefix(name: str) -> str:
    """``module._orig_mod.visual.proj`` -> ``visual.proj``."""
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
                changed = True
    return name


def unwrap(model: nn.Module) -> nn.Module:
    """The plain open_clip module under DataParallel / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def set_training(model: nn.Module, *, batchnorm: str = "frozen") -> nn.Module:
    """Put ``model`` in training mode for fine-tuning.

    With ``batchnorm="frozen"`` every BatchNorm layer stays in eval mode: it normalises
    with the pretrained running statistics and never updates them, so no method changes
    the model through state its optimizer does not control (its affine weights still
    train). ``"update"`` re-estimates the statistics on the training batches.
    """
    model.train()
    if batchnorm == "frozen":
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
    return model


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A snapshot of the state dict: wrapper prefixes removed, copied to the CPU, contiguous.

    Always a copy, also for a model on the CPU, so later training does not change it.
    """
    return {
        strip_wrapper_prefix(k): v.detach().to("cpu", copy=True).contiguous()
        for k, v in model.state_dict().items()
    }


def create_model(arch: str, pretrained: str, *, device: str | torch.device = "cpu",
                 cache_dir: str | None = None) -> nn.Module:
    """Build ``arch`` with open_clip and load ``pretrained`` (tag, weights file or ``none``).

    ``cache_dir`` is where open_clip looks for (and downloads) hub weights; default:
    the Hugging Face cache.

    Raises :class:`CheckpointError` with a one-line message when the weights are missing
    or do not fit the architecture.
    """
    kwargs: dict[str, object] = {"device": device, "cache_dir": cache_dir}
    if pretrained != "none":
        _load_tag_providers()
        build = _TAG_BUILDERS.get((arch, tag_key(pretrained)))
        if build is not None:
            # Resolved now, not at import: the cache directory may have changed since.
            register_pretrained_tag(arch, pretrained, build(), build=build)
        if open_clip.get_pretrained_cfg(arch, pretrained):
            # OpenAI weights were trained with QuickGELU; building ViT-B-16 without it
            # silently changes every activation of the pretrained network.
            kwargs["force_quick_gelu"] = uses_quick_gelu(arch, pretrained)
        elif not Path(pretrained).is_file():
            raise CheckpointError(f"pretrained {pretrained!r}: no such file and not a known tag for {arch}")
        kwargs["pretrained"] = pretrained
    try:
        with _quiet_random_init(pretrained == "none"):
            model = open_clip.create_model(arch, **kwargs)
    except Exception as exc:  # open_clip's loaders raise many kinds (SafetensorError among them)
        first = first_line(exc)
        if isinstance(exc, (AssertionError, KeyError)) or "size mismatch" in first or "Missing key" in first:
            first = f"the weights do not fit this architecture ({first[:300]})"
        raise CheckpointError(f"pretrained {pretrained!r} for model {arch}: {first[:400]}") from None
    return model


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


@contextlib.contextmanager
def _quiet_random_init(active: bool):
    """open_clip warns on the root logger when no weights load; ``none`` asks for exactly that."""
    flt = _DropRandomInitWarning()
    root = logging.getLogger()
    if active:
        root.addFilter(flt)
    try:
        yield
    finally:
        root.removeFilter(flt)


def eval_transform(model: nn.Module):
    """The model's own open_clip evaluation preprocessing (resize, centre crop, normalise)."""
    return image_transform_v2(preprocess_cfg(model), is_train=False)


def preprocess_cfg(model: nn.Module) -> PreprocessCfg:
    return PreprocessCfg(**open_clip.get_model_preprocess_cfg(unwrap(model)))


def image_size(model: nn.Module) -> int:
    size = preprocess_cfg(model).size
    return int(size if isinstance(size, int) else size[0])


def get_tokenizer(arch: str):
    return open_clip.get_tokenizer(arch)


def check_weights_readable(path: str | os.PathLike, key: str = "weights file") -> None:
    """Refuse a weights file whose header cannot be read (cut short, or not weights at all), cheaply.

    ``.safetensors``: the header is parsed, no tensor is read. ``.pt``/``.bin``: loaded
    memory-mapped with ``weights_only=True`` (a legacy, non-zip file is loaded whole).
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            read_safetensors_header(path, key)
        else:
            try:
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as exc:  # UnpicklingError, zip errors: all the same to the user
        raise CheckpointError(f"{key} = {str(path)!r}: not a readable weights file ({type(exc).__name__}: "
                              f"{first_line(exc, 160)})") from None


def read_safetensors(path: str | os.PathLike, key: str) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors file ``path``: the one place dps_tune loads one.

    The header is checked first against the file's size (:func:`~dps_tune.layout.read_safetensors_header`,
    also used without torch), so a file cut short is one :class:`CheckpointError` line naming ``key``.
    """
    read_safetensors_header(path, key)
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # a damaged tensor body, an unknown dtype, ...
        raise CheckpointError(f"{key} = {str(path)!r}: cannot be read ({type(exc).__name__}: "
                              f"{first_line(exc, 160)})") from None


def load_weights_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a state dict from safetensors or ``torch.load(weights_only=True)``.

    A checkpoint directory is accepted and its ``model.safetensors`` is read.
    Wrapper prefixes (``module.``, ``_orig_mod.``) are removed from the names.
    """
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise CheckpointError(f"weights file {str(path)!r}: no such file")
    if path.suffix == ".safetensors":
        return {strip_wrapper_prefix(k): v for k, v in read_safetensors(path, "weights file").items()}
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, pickle with code in it, ...
        raise CheckpointError(f"weights file {str(path)!r}: cannot be read safely ({type(exc).__name__}: "
                              f"{first_line(exc, 200)})") from None
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"weights file {str(path)!r}: not a state dict of tensors")
    return {strip_wrapper_prefix(k): v for k, v in state.items()}


def parameter_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    """Every trainable parameter of ``arch`` and its shape, without allocating any weights."""
    model = create_model(arch, "none", device="meta")
    return {name: tuple(p.shape) for name, p in model.named_parameters() if p.requires_grad}


def pretrained_state_dict(arch: str, pretrained: str, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """The weights a trial with this ``seed`` starts from, as a plain CPU state dict.

    For ``pretrained="none"`` that is the random initialisation after
    ``torch.manual_seed(seed)``, exactly as :func:`dps_tune.train.run_trial` draws it.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return plain_state_dict(create_model(arch, pretrained))
