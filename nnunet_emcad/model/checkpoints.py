"""Reading weight files safely, checking them against a model, and loading ImageNet PVTv2 weights into timm's PVTv2.

Files are read without running pickled code (``torch.load(weights_only=True)``, or safetensors), and every
load is strict: a file with keys for another model fails with the lists of missing, unexpected and
mis-shaped keys instead of leaving half a model initialised.
"""
import logging
import os
from typing import Callable, Dict, Mapping, TypeVar, Union

import timm
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from timm.models import adapt_input_conv
from timm.models.pvt_v2 import checkpoint_filter_fn
from torch import nn

logger = logging.getLogger(__name__)

StateDict = Dict[str, torch.Tensor]
Fetched = TypeVar('Fetched')
CheckpointSource = Union[str, os.PathLike, Mapping[str, torch.Tensor]]


class CheckpointError(ValueError):
    """A weight file that cannot be read, or whose keys or shapes do not fit the model."""


def read_state_dict(source: CheckpointSource) -> StateDict:
    """A flat ``{name: tensor}`` dict from a path (``.pth``/``.pt``/``.safetensors``) or a mapping.

    Unwraps ``{'state_dict': ...}`` / ``{'model': ...}`` containers and DataParallel's ``module.`` prefix.
    """
    if isinstance(source, Mapping):
        obj = source
    else:
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise CheckpointError(f"weight file {path} does not exist")
        try:
            if path.endswith('.safetensors'):
                obj = load_file(path, device='cpu')
            else:
                obj = torch.load(path, map_location='cpu', weights_only=True)
        except Exception as e:
            raise CheckpointError(f"cannot read weight file {path}: it is truncated, not a PyTorch/safetensors "
                                  f"checkpoint, or holds objects other than tensors "
                                  f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    for container in ('state_dict', 'model'):
        if isinstance(obj, Mapping) and isinstance(obj.get(container), Mapping):
            obj = obj[container]
    if not isinstance(obj, Mapping) or not obj or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise CheckpointError(f"{source if not isinstance(source, Mapping) else 'the given mapping'} is not a "
                              f"state dict of named tensors")
    if all(k.startswith('module.') for k in obj):
        obj = {k[len('module.'):]: v for k, v in obj.items()}
    return dict(obj)


def check_state_dict(expected: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor], what: str,
                     fix: str = '') -> None:
    """Raise ``CheckpointError`` listing missing, unexpected and mis-shaped keys unless ``state_dict`` fits."""
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mis_shaped = sorted(f"{k}: file {tuple(state_dict[k].shape)}, model {tuple(expected[k].shape)}"
                        for k in set(expected) & set(state_dict) if expected[k].shape != state_dict[k].shape)
    if missing or unexpected or mis_shaped:
        def block(title, keys):
            return f"\n  {title} ({len(keys)}): " + ', '.join(keys[:20]) + (' ...' if len(keys) > 20 else '')
        raise CheckpointError(f"{what} do not fit the model; nothing was loaded."
                              + (block('missing keys', missing) if missing else '')
                              + (block('unexpected keys', unexpected) if unexpected else '')
                              + (block('shape mismatches', mis_shaped) if mis_shaped else '')
                              + (f"\n{fix}" if fix else ''))


TIMM_PRETRAINED = 'timm'
"""The weights-setting value that asks for timm's own pretrained weights instead of a local file."""


def first_rank_first(fetch: Callable[[], Fetched]) -> Fetched:
    """``fetch()`` on the first rank of a torch.distributed process group before the others (which then find
    what it cached), on each rank alike without one. Should the first rank fail, the others go on and fail alike
    instead of waiting."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return fetch()
    if dist.get_rank() == 0:
        try:
            return fetch()
        finally:
            dist.barrier()
    dist.barrier()
    return fetch()


def timm_pretrained_weights(variant: str) -> StateDict:
    """ImageNet weights of PVTv2 ``variant`` through timm's own pretrained mechanism: the Hugging Face hub
    (``timm/<variant>.in1k``), downloaded on first use into its cache (``$HF_HOME``, by default
    ``~/.cache/huggingface``) and read from there after; with ``HF_HUB_OFFLINE=1`` from the cache alone. Under
    DDP the first rank downloads while the others wait for the cache (``first_rank_first``)."""
    try:
        return first_rank_first(lambda: timm.create_model(variant, pretrained=True, num_classes=0).state_dict())
    except (OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"timm could not fetch the ImageNet {variant} weights ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}): reach the Hugging Face hub once (timm "
                              f"caches them), or put the checkpoint in a folder and point the variable at it") from e


def load_pvt_v2_weights(model: nn.Module, source: CheckpointSource) -> None:
    """Load PVTv2 weights (timm or original PVT key names, classifier head ignored) strictly into a timm PVTv2.

    An RGB patch embedding is adapted to the model's input channels the way timm does for ``in_chans``.
    """
    state_dict = {k: v for k, v in read_state_dict(source).items() if not k.startswith('head.')}
    state_dict = checkpoint_filter_fn(state_dict, model)
    in_chans = model.patch_embed.proj.in_channels
    weight = state_dict.get('patch_embed.proj.weight')
    if weight is not None and weight.ndim == 4 and weight.shape[1] != in_chans:
        state_dict['patch_embed.proj.weight'] = adapt_input_conv(in_chans, weight)
    name = 'the PVTv2 weights' + ('' if isinstance(source, Mapping) else f" in {os.fspath(source)}")
    check_state_dict(model.state_dict(), state_dict, name)
    model.load_state_dict(state_dict)
    logger.info("loaded %s (%d tensors)", name, len(state_dict))
