"""Reading weight files safely, loading ImageNet PVTv2 weights, and importing official EMCAD checkpoints.

Files are read without running pickled code (``torch.load(weights_only=True)``, or safetensors), and every
load is strict: a file with keys for another model fails with the lists of missing, unexpected and
mis-shaped keys instead of leaving half a model initialised.
"""
import logging
import os
import re
from collections import OrderedDict
from typing import Dict, Mapping, Optional, Union

import torch
from torch import nn

from nnunet_emcad.emcad import EMCADNet, PVTv2Encoder, create_emcad_pvt

logger = logging.getLogger(__name__)

StateDict = Dict[str, torch.Tensor]
CheckpointSource = Union[str, os.PathLike, Mapping[str, torch.Tensor]]

# (stage-1 width, blocks per stage) of each PVTv2 variant, as timm and the original PVT code define them.
PVT_V2_SHAPES = OrderedDict([
    ('pvt_v2_b0', (32, (2, 2, 2, 2))),
    ('pvt_v2_b1', (64, (2, 2, 2, 2))),
    ('pvt_v2_b2', (64, (3, 4, 6, 3))),
    ('pvt_v2_b3', (64, (3, 4, 18, 3))),
    ('pvt_v2_b4', (64, (3, 8, 27, 3))),
    ('pvt_v2_b5', (64, (3, 6, 40, 3))),
])


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
                from safetensors.torch import load_file
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


def load_pvt_v2_weights(model: nn.Module, source: CheckpointSource) -> None:
    """Load PVTv2 weights (timm or original PVT key names, classifier head ignored) strictly into a timm PVTv2.

    An RGB patch embedding is adapted to the model's input channels the way timm does for ``in_chans``.
    """
    from timm.models import adapt_input_conv
    from timm.models.pvt_v2 import checkpoint_filter_fn

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


def infer_pvt_v2_variant(backbone: Mapping[str, torch.Tensor]) -> str:
    """The PVTv2 variant whose stage-1 width and blocks per stage match a backbone state dict."""
    from timm.models.pvt_v2 import checkpoint_filter_fn

    keys = checkpoint_filter_fn(dict(backbone), None)
    width = keys['patch_embed.proj.weight'].shape[0] if 'patch_embed.proj.weight' in keys else None
    depths = tuple(len({m.group(1) for m in (re.match(rf'stages\.{i}\.blocks\.(\d+)\.', k) for k in keys) if m})
                   for i in range(4))
    for variant, shape in PVT_V2_SHAPES.items():
        if shape == (width, depths):
            return variant
    raise CheckpointError(f"backbone with stage-1 width {width} and blocks per stage {depths} is no PVTv2 variant "
                          f"({', '.join(f'{v}: {s}' for v, s in PVT_V2_SHAPES.items())})")


_OFFICIAL_RENAMES = (
    (re.compile(r'^conv\.'), 'encoder.stem.'),
    (re.compile(r'^out_head(\d)\.'), lambda m: f'decoder.seg_layers.{int(m.group(1)) - 1}.'),
    (re.compile(r'^decoder\.mscb(\d)\.0\.'), lambda m: f'decoder.mscb.{int(m.group(1)) - 1}.'),
    (re.compile(r'^decoder\.eucb(\d)\.pwc\.0\.'), lambda m: f'decoder.eucb.{int(m.group(1)) - 1}.pwc.'),
    (re.compile(r'^decoder\.(eucb|lgag|cab)(\d)\.'), lambda m: f'decoder.{m.group(1)}.{int(m.group(2)) - 1}.'),
)


def official_to_emcad_key(key: str) -> str:
    """Our name for a non-backbone key of the official ``EMCADNet`` (``decoder.mscb4.0.x`` -> ``decoder.mscb.3.x``)."""
    for pattern, replacement in _OFFICIAL_RENAMES:
        key, n = pattern.subn(replacement, key, count=1)
        if n:
            break
    return key


def load_official_checkpoint(checkpoint: CheckpointSource, variant: Optional[str] = None,
                             dw_parallel: bool = True, activation: str = 'relu6') -> EMCADNet:
    """Our network equivalent to an official EMCAD checkpoint (``state_dict`` or a ``.pth`` path).

    The PVTv2 variant, class count, grey-scale stem, MSDC kernel sizes, expansion factor, sum/concat and LGAG
    kernel are read off the keys and shapes; ``dw_parallel`` and ``activation`` hold no weights, so they take
    the official training defaults unless given. Returned in eval mode with deep supervision off: its output
    is the official prediction (the stride-4 head upsampled to the input size). Turning deep supervision on
    gives all four heads at the input size, highest resolution (the official ``p1``) first.
    A checkpoint without backbone keys needs ``variant`` and leaves the encoder freshly initialised.
    """
    state_dict = read_state_dict(checkpoint)
    backbone = {k[len('backbone.'):]: v for k, v in state_dict.items() if k.startswith('backbone.')}
    rest = {k: v for k, v in state_dict.items() if not k.startswith('backbone.')}
    if 'out_head1.weight' not in rest or 'decoder.mscb1.0.pconv1.0.weight' not in rest:
        raise CheckpointError("not an official EMCAD checkpoint: it lacks 'out_head1.weight' and "
                              "'decoder.mscb1.0.pconv1.0.weight'")
    if backbone:
        found = infer_pvt_v2_variant(backbone)
        if variant is not None and variant != found:
            raise CheckpointError(f"the checkpoint's backbone is {found}, not the requested {variant}")
        variant = found
    elif variant is None:
        if rest['decoder.mscb1.0.pconv2.0.weight'].shape[0] != 32:
            raise CheckpointError("the checkpoint has no backbone keys and its decoder widths fit PVTv2 b1..b5; "
                                  "pass variant='pvt_v2_b2' (or the one it was trained with)")
        variant = 'pvt_v2_b0'
    pconv1 = rest['decoder.mscb1.0.pconv1.0.weight']
    ex_channels = pconv1.shape[0]
    kernel_sizes = []
    while f'decoder.mscb1.0.msdc.dwconvs.{len(kernel_sizes)}.0.weight' in rest:
        kernel_sizes.append(rest[f'decoder.mscb1.0.msdc.dwconvs.{len(kernel_sizes)}.0.weight'].shape[-1])
    grey_stem = 'conv.0.weight' in rest
    model = create_emcad_pvt(
        variant, num_classes=rest['out_head1.weight'].shape[0], in_channels=1 if grey_stem else 3,
        grey_stem=grey_stem, pretrained=backbone or None, deep_supervision=False, upsample_outputs='all',
        kernel_sizes=kernel_sizes, expansion_factor=ex_channels // pconv1.shape[1], dw_parallel=dw_parallel,
        add=rest['decoder.mscb1.0.pconv2.0.weight'].shape[1] == ex_channels,
        lgag_ks=rest['decoder.lgag1.W_g.0.weight'].shape[-1], activation=activation)
    mapped = {official_to_emcad_key(k): v for k, v in rest.items()}
    own = {k: v for k, v in model.state_dict().items() if not k.startswith('encoder.body.')}
    check_state_dict(own, mapped, "the official checkpoint's decoder, heads and stem")
    model.load_state_dict(mapped, strict=False)
    if not backbone:
        logger.warning("official checkpoint without backbone keys: the %s encoder is freshly initialised", variant)
    return model.eval()


def official_weights_for(network: EMCADNet, checkpoint: CheckpointSource) -> StateDict:
    """An official EMCAD checkpoint's weights under ``network``'s key names, to fine-tune ``network`` from them.

    ``network`` is what a PVT trainer builds for the dataset; the result goes into nnU-Net's
    ``-pretrained_weights`` file. Encoder variant and input channels must match; each mismatch stops with the
    fix. The segmentation heads are left out: nnU-Net never transfers them (it trains new ones), so the class
    counts may differ. BatchNorm running statistics of the official decoder are left out where the network
    normalises with instance norm (the trainers do); their affine weights are kept.
    """
    if not isinstance(network.encoder, PVTv2Encoder):
        raise CheckpointError(f"official EMCAD checkpoints hold a PVTv2 encoder, this network's encoder is "
                              f"{type(network.encoder).__name__}: use nnUNetTrainerEMCAD_PVTb2 or _PVTb0")
    source = load_official_checkpoint(checkpoint)
    found, wanted = source.encoder.variant, network.encoder.variant
    if found != wanted:
        raise CheckpointError(f"the checkpoint's encoder is {found}, the network's is {wanted}: use the trainer "
                              f"with the checkpoint's encoder (nnUNetTrainerEMCAD_PVT{found[-2:]})")
    src_channels = 1 if source.encoder.stem is not None else source.encoder.in_channels
    if src_channels != network.encoder.in_channels:
        raise CheckpointError(f"the checkpoint was trained on {src_channels}-channel images, the dataset has "
                              f"{network.encoder.in_channels} channel(s), which its stem cannot take. Start from "
                              f"ImageNet weights instead (nnUNet_EMCAD_PVT_WEIGHTS): timm adapts their patch "
                              f"embedding to any channel count")
    target = {k: v for k, v in network.state_dict().items() if '.seg_layers.' not in k}
    weights = {k: v for k, v in source.state_dict().items() if k in target}
    check_state_dict(target, weights, "the official checkpoint's weights")
    return weights
