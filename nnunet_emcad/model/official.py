"""Official EMCAD checkpoints: their key names renamed to ours, their settings read off the keys and shapes.

The official code names its containers differently (``decoder.mscb4.0.x`` for our ``decoder.mscb.3.x``) and
keeps the backbone under ``backbone.`` in the original PVT's names; the blocks inside are the same, so a
checkpoint imports by renaming. Reading and checking the file is ``nnunet_emcad.model.checkpoints``' work.
"""
import logging
import re
from typing import Dict, Mapping, Optional, Tuple

import torch
from timm.models.pvt_v2 import checkpoint_filter_fn

from nnunet_emcad.model.checkpoints import CheckpointError, CheckpointSource, StateDict, check_state_dict, read_state_dict
from nnunet_emcad.model.emcad import PVT_V2_VARIANTS, EMCADNet, PVTv2Encoder, create_emcad_pvt

logger = logging.getLogger(__name__)

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


def infer_pvt_v2_variant(backbone: Mapping[str, torch.Tensor]) -> str:
    """The PVTv2 variant whose stage-1 width and blocks per stage match a backbone state dict."""
    keys = checkpoint_filter_fn(dict(backbone), None)
    width = keys['patch_embed.proj.weight'].shape[0] if 'patch_embed.proj.weight' in keys else None
    depths = tuple(len({m.group(1) for m in (re.match(rf'stages\.{i}\.blocks\.(\d+)\.', k) for k in keys) if m})
                   for i in range(4))
    for variant, shape in PVT_V2_VARIANTS.items():
        if shape == (width, depths):
            return variant
    raise CheckpointError(f"backbone with stage-1 width {width} and blocks per stage {depths} is no PVTv2 variant "
                          f"({', '.join(f'{v}: {s}' for v, s in PVT_V2_VARIANTS.items())})")


def split_official(state_dict: Mapping[str, torch.Tensor]) -> Tuple[StateDict, StateDict]:
    """An official checkpoint's backbone (``backbone.`` prefix removed) and the rest: stem, decoder, heads."""
    backbone = {k[len('backbone.'):]: v for k, v in state_dict.items() if k.startswith('backbone.')}
    rest = {k: v for k, v in state_dict.items() if not k.startswith('backbone.')}
    if 'out_head1.weight' not in rest or 'decoder.mscb1.0.pconv1.0.weight' not in rest:
        raise CheckpointError("not an official EMCAD checkpoint: it lacks 'out_head1.weight' and "
                              "'decoder.mscb1.0.pconv1.0.weight'")
    return backbone, rest


def official_variant(backbone: Mapping[str, torch.Tensor], rest: Mapping[str, torch.Tensor],
                     variant: Optional[str]) -> str:
    """The checkpoint's PVTv2 variant: read off the backbone, or given (b0 is told apart by its decoder widths)."""
    if backbone:
        found = infer_pvt_v2_variant(backbone)
        if variant is not None and variant != found:
            raise CheckpointError(f"the checkpoint's backbone is {found}, not the requested {variant}")
        return found
    if variant is not None:
        return variant
    if rest['decoder.mscb1.0.pconv2.0.weight'].shape[0] != 32:
        raise CheckpointError("the checkpoint has no backbone keys and its decoder widths fit PVTv2 b1..b5; "
                              "pass variant='pvt_v2_b2' (or the one it was trained with)")
    return 'pvt_v2_b0'


def official_settings(rest: Mapping[str, torch.Tensor]) -> Dict:
    """``create_emcad_pvt`` arguments read off the non-backbone keys: classes, input channels, grey-scale stem,
    MSDC kernel sizes, expansion factor, sum/concat and LGAG kernel."""
    pconv1 = rest['decoder.mscb1.0.pconv1.0.weight']
    ex_channels = pconv1.shape[0]
    kernel_sizes = []
    while f'decoder.mscb1.0.msdc.dwconvs.{len(kernel_sizes)}.0.weight' in rest:
        kernel_sizes.append(rest[f'decoder.mscb1.0.msdc.dwconvs.{len(kernel_sizes)}.0.weight'].shape[-1])
    grey_stem = 'conv.0.weight' in rest
    return dict(num_classes=rest['out_head1.weight'].shape[0], in_channels=1 if grey_stem else 3,
                grey_stem=grey_stem, kernel_sizes=kernel_sizes, expansion_factor=ex_channels // pconv1.shape[1],
                add=rest['decoder.mscb1.0.pconv2.0.weight'].shape[1] == ex_channels,
                lgag_ks=rest['decoder.lgag1.W_g.0.weight'].shape[-1])


def load_official_checkpoint(checkpoint: CheckpointSource, variant: Optional[str] = None,
                             dw_parallel: bool = True, activation: str = 'relu6') -> EMCADNet:
    """Our network equivalent to an official EMCAD checkpoint (``state_dict`` or a ``.pth`` path).

    The PVTv2 variant and the decoder's settings are read off the keys and shapes (``official_settings``);
    ``dw_parallel`` and ``activation`` hold no weights, so they take the official training defaults unless
    given. Returned in eval mode with deep supervision off: its output is the official prediction (the
    stride-4 head upsampled to the input size). Turning deep supervision on gives all four heads at the input
    size, highest resolution (the official ``p1``) first.
    A checkpoint without backbone keys needs ``variant`` and leaves the encoder freshly initialised.
    """
    backbone, rest = split_official(read_state_dict(checkpoint))
    variant = official_variant(backbone, rest, variant)
    model = create_emcad_pvt(variant, pretrained=backbone or None, deep_supervision=False, upsample_outputs='all',
                             dw_parallel=dw_parallel, activation=activation, **official_settings(rest))
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
