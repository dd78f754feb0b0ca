"""Classifiers from outside cuba's own three: torchvision and timm architectures, and the user's own.

A model name in a config is one of:

* a registered name (``simplecnn``, ``resnet18``, ``preactresnet18``);
* ``torchvision:NAME`` -- ``torchvision.models.NAME(weights=None, num_classes=K)`` with its stem
  adapted to the data: the first convolution takes the data's channels, and for the ResNet family
  on small images (< 64 px) the stem becomes the CIFAR one (3x3, stride 1, no max-pool), as in
  cuba's own ResNet18. Tested for the ResNet, VGG, MobileNet and EfficientNet families;
* ``timm:NAME`` -- ``timm.create_model(NAME, pretrained=False, num_classes=K, in_chans=C)`` where
  timm is installed (an optional extra, never required);
* ``package.module:factory`` -- the user's own: ``factory`` (a function or an ``nn.Module`` class)
  is called with whichever of ``in_channels``, ``num_classes``, ``image_size`` it accepts and must
  return a module mapping [0, 1] images (B, C, H, W) to logits (B, K). The run records this path,
  so ``cuba evaluate`` and ``cuba defend`` rebuild the model in a later process.

Every model is tried on one dummy batch when it is built: one that cannot take the data's images
(VGG's five poolings on 16x16 digits) fails then, with a message naming the model and the size,
rather than in the middle of training.

Defenses that hook internal layers (Fine-pruning, SentiNet, NAD) read ``feature_stages`` -- the
names of three feature stages, shallow to deep. cuba sets them for the torchvision families it
knows; a user's module may declare them (a ``feature_stages`` attribute); without them those
defenses report n/a.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
from typing import Any, Callable

import torch
from torch import nn

from ..formatting import first_line

# a user module handed to cuba.api in this process, by its import path: trained as given (its
# initial weights), while a later process rebuilds the same architecture from the path
_INSTANCES: dict[str, nn.Module] = {}
USER_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def is_external(name: str) -> bool:
    return ":" in str(name)


def check_name(name: str) -> str | None:
    """Why ``name`` is not a valid external model name, or None (the config's check)."""
    prefix, _, rest = str(name).partition(":")
    if prefix in ("torchvision", "timm"):
        return None if re.fullmatch(r"[A-Za-z0-9_.\-]+", rest) else f"{prefix}:NAME needs an architecture name, got {name!r}"
    if not USER_PATH.match(str(name)):
        return f"an own model is given as package.module:factory, got {name!r}"
    return None


def register_instance(path: str, module: nn.Module) -> None:
    _INSTANCES[path] = module


def _call_with_accepted(factory: Callable[..., Any], **kwargs: Any) -> Any:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a builtin without a signature: call it bare
        return factory()
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return factory(**kwargs)
    return factory(**{k: v for k, v in kwargs.items() if k in params})


def _first_conv(model: nn.Module) -> tuple[str, nn.Conv2d]:
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            return name, m
    raise ValueError("has no Conv2d layer to adapt to the data's channels")


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _torchvision(arch: str, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    from torchvision import models

    known = models.list_models(module=models)  # classification architectures only
    if arch not in known:
        raise ValueError(f"torchvision.models has no classification architecture {arch!r} "
                         f"(e.g. {', '.join(a for a in known if a in ('resnet18', 'vgg11', 'mobilenet_v2', 'efficientnet_b0'))})")
    model = models.get_model(arch, weights=None, num_classes=num_classes)
    name, conv = _first_conv(model)
    small_resnet = isinstance(model, models.ResNet) and image_size < 64
    if conv.in_channels != in_channels or small_resnet:
        kernel, stride, padding = ((3, 3), (1, 1), (1, 1)) if small_resnet else (conv.kernel_size, conv.stride, conv.padding)
        _set_module(model, name, nn.Conv2d(in_channels, conv.out_channels, kernel, stride, padding, bias=conv.bias is not None))
    if small_resnet:
        model.maxpool = nn.Identity()
    model.feature_stages = _torchvision_stages(model)
    return model


def _torchvision_stages(model: nn.Module) -> list[str]:
    """Three feature stages, shallow to deep: ResNet layer2-4; VGG the activations feeding its last
    three poolings; otherwise the last three blocks of ``features`` (MobileNet, EfficientNet)."""
    if all(hasattr(model, f"layer{i}") for i in (2, 3, 4)):
        return ["layer2", "layer3", "layer4"]
    features = getattr(model, "features", None)
    if not isinstance(features, nn.Sequential) or len(features) < 3:
        return []
    pools = [i for i, m in enumerate(features) if isinstance(m, nn.MaxPool2d) and i > 0]
    if len(pools) >= 3:
        return [f"features.{i - 1}" for i in pools[-3:]]
    return [f"features.{i}" for i in range(len(features) - 3, len(features))]


def _timm(arch: str, in_channels: int, num_classes: int) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise ValueError("timm:NAME needs timm (pip install -e '.[timm]'); it is optional") from None
    try:
        return timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_channels)
    except RuntimeError as e:  # timm's "Unknown model"
        raise ValueError(f"timm has no architecture {arch!r}: {e}") from None


def _user(path: str, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    import copy

    if path in _INSTANCES:
        return copy.deepcopy(_INSTANCES[path])
    module_name, _, attr = path.partition(":")
    # the console script, unlike `python -m cuba`, does not put the working folder on sys.path: a
    # module next to the user (the own-model tutorial's layout) is found either way; appended, so it
    # never shadows an installed package
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    try:
        factory: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"cannot import {path!r} ({e}); run from the folder that holds it, or put its package "
                         "on the Python path (PYTHONPATH)") from None
    try:
        for part in attr.split("."):
            factory = getattr(factory, part)
    except AttributeError:
        raise ValueError(f"cannot import {path!r}: module {module_name!r} has no {attr!r}") from None
    model = _call_with_accepted(factory, in_channels=in_channels, num_classes=num_classes, image_size=image_size)
    if not isinstance(model, nn.Module):
        raise ValueError(f"{path} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def build_external(name: str, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """The backbone for an external model name, checked on one dummy batch of the data's shape."""
    why = check_name(name)
    if why:
        raise ValueError(why)
    prefix, _, rest = name.partition(":")
    if prefix == "torchvision":
        model = _torchvision(rest, in_channels, num_classes, image_size)
    elif prefix == "timm":
        model = _timm(rest, in_channels, num_classes)
    else:
        model = _user(name, in_channels, num_classes, image_size)
    _check_shape(model, name, in_channels, num_classes, image_size)
    return model


def _check_shape(model: nn.Module, name: str, in_channels: int, num_classes: int, image_size: int) -> None:
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.rand(2, in_channels, image_size, image_size))
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"{name} cannot take {in_channels}x{image_size}x{image_size} images: {first_line(e)}") from None
    finally:
        model.train(was)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"{name} must map images to (batch, {num_classes}) logits, got {shape}")
