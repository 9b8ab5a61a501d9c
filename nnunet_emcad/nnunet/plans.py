"""nnU-Net's plans -> EMCAD networks: plan strings resolved once, nnU-Net's own encoders built from a
configuration's ``arch_kwargs`` (dynamic-network-architectures), the EMCAD decoder over them.

2D and 3D plans alike: the decoder's kernels follow the plan's per-stage kernel sizes (1 along axes a stage
does not convolve, as in nnU-Net's anisotropic 3D plans) and its upsampling the per-axis strides.
"""
import pydoc
from functools import partial
from typing import Mapping, Sequence

from dynamic_network_architectures.building_blocks.plain_conv_encoder import PlainConvEncoder
from dynamic_network_architectures.building_blocks.residual_encoders import ResidualEncoder
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager
from torch import nn

from nnunet_emcad.model.blocks import NormFactory, fast_cpu_norm
from nnunet_emcad.model.emcad import EMCADNet, stages_up_to_stride, total_strides
from nnunet_emcad.model.encoders import RECOMPUTED

REQUIRES_IMPORT = ('conv_op', 'norm_op', 'dropout_op', 'nonlin')
"""The ``arch_kwargs`` that plans files hold as import strings (their ``_kw_requires_import``)."""

# Blocks per stage of nnU-Net's ResEnc planners (ResEncUNetPlanner.UNet_blocks_per_stage_encoder), used when a
# residual encoder is built from plain-U-Net plans that only give convolutions per stage.
RESENC_BLOCKS_PER_STAGE = (1, 3, 4, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6)


def resolve_arch_kwargs(arch_kwargs: Mapping, requires_import: Sequence[str] = REQUIRES_IMPORT) -> dict:
    """``arch_kwargs`` with the import strings among ``requires_import`` replaced by what they name."""
    kwargs = dict(arch_kwargs)
    for key in requires_import:
        if isinstance(kwargs.get(key), str):
            located = pydoc.locate(kwargs[key])
            if located is None:
                raise ImportError(f"plans name {kwargs[key]!r} for {key!r}, which cannot be imported")
            kwargs[key] = located
    return kwargs


def configuration_arch_kwargs(configuration_manager: ConfigurationManager) -> dict:
    """A plans configuration's ``arch_kwargs``, resolved."""
    return resolve_arch_kwargs(configuration_manager.network_arch_init_kwargs,
                               configuration_manager.network_arch_init_kwargs_req_import)


def configuration_encoder_kind(configuration_manager: ConfigurationManager) -> str:
    """'residual' for ResEnc plans (``ResidualEncoderUNet``), else 'plain'."""
    return 'residual' if 'Residual' in configuration_manager.network_arch_class_name else 'plain'


def build_nnunet_encoder(arch_kwargs: Mapping, input_channels: int, kind: str = 'plain',
                         recompute_stages: int = 0) -> nn.Module:
    """nnU-Net's ``PlainConvEncoder`` or ``ResidualEncoder`` from resolved ``arch_kwargs``, whose first
    ``recompute_stages`` stages run again in backward (``nnunet_emcad.model.encoders``; 0: nnU-Net's class as it is).

    Plain plans give ``n_conv_per_stage``, ResEnc plans ``n_blocks_per_stage``; a residual encoder built from
    plain plans takes the ResEnc planners' blocks per stage.
    """
    kw = arch_kwargs
    n_stages = kw['n_stages']
    if kind == 'plain':
        encoder_class = PlainConvEncoder
        own = dict(n_conv_per_stage=kw.get('n_conv_per_stage', kw.get('n_blocks_per_stage')),
                   nonlin_first=kw.get('nonlin_first', False))
    elif kind == 'residual':
        encoder_class = ResidualEncoder
        own = dict(n_blocks_per_stage=kw.get('n_blocks_per_stage', RESENC_BLOCKS_PER_STAGE[:n_stages]),
                   **{k: kw[k] for k in ('block', 'bottleneck_channels', 'stem_channels') if kw.get(k) is not None})
    else:
        raise ValueError(f"unknown nnU-Net encoder kind {kind!r}; choose 'plain' or 'residual'")
    if recompute_stages:
        encoder_class, own = RECOMPUTED[encoder_class], dict(own, recompute_stages=recompute_stages)
    return encoder_class(
        input_channels=input_channels, n_stages=n_stages, features_per_stage=kw['features_per_stage'],
        conv_op=kw['conv_op'], kernel_sizes=kw['kernel_sizes'], strides=kw['strides'],
        conv_bias=kw.get('conv_bias', False), norm_op=kw.get('norm_op'), norm_op_kwargs=kw.get('norm_op_kwargs'),
        dropout_op=kw.get('dropout_op'), dropout_op_kwargs=kw.get('dropout_op_kwargs'), nonlin=kw.get('nonlin'),
        nonlin_kwargs=kw.get('nonlin_kwargs'), return_skips=True, **own)


def first_stage_at_stride(strides: Sequence, stride: int) -> int:
    """The shallowest stage whose total stride (along its most-strided axis) reaches ``stride``; the deepest
    stage when none does."""
    return next((stage for stage, total in enumerate(total_strides(strides)) if max(total) >= stride),
                len(strides) - 1)


def decoded_first_stage(strides: Sequence, decoder_stride: int) -> int:
    """The first stage the EMCAD decoder decodes: ``first_stage_at_stride``, but at least the two deepest
    stages (nnU-Net's deep supervision gives the deepest head weight 0, so one head would learn nothing)."""
    return min(first_stage_at_stride(strides, decoder_stride), max(0, len(strides) - 2))


def plan_norm(arch_kwargs: Mapping) -> NormFactory:
    """The plan's normalisation (``norm_op`` with ``norm_op_kwargs``, resolved) as a factory of the channel count,
    for the decoder: instance norm as ``blocks.fast_cpu_norm``'s subclass (the same normalisation and parameters,
    a faster CPU kernel). The encoder keeps the plan's class, as stock nnU-Net builds it."""
    return partial(fast_cpu_norm(arch_kwargs['norm_op']), **(arch_kwargs.get('norm_op_kwargs') or {}))


def create_emcad_unet(arch_kwargs: Mapping, input_channels: int, num_classes: int, encoder: str = 'plain',
                      deep_supervision: bool = True, arch_kwargs_req_import: Sequence[str] = REQUIRES_IMPORT,
                      decoder_norm: str = 'batch', decoder_stride: int = 1, recompute_stride: int = 0,
                      recompute_encoder: bool = False, mscb_only_stride: int = 0, **decoder_kwargs) -> EMCADNet:
    """EMCAD over nnU-Net's own encoder, self-configured by a plans configuration's ``arch_kwargs``.

    One head per decoded stage: outputs come at strides ``cumprod(strides)``, highest resolution first.
    ``decoder_stride`` is the finest stride decoded with EMCAD's full stages (1: every stage; 4: from the
    stage at stride 4, as the paper decodes a PVT; at least the two deepest stages are decoded); see
    ``EMCADDecoder``'s ``first_stage`` and ``light_stages``. The decoder stages at strides up to
    ``recompute_stride`` run again in backward instead of keeping their activations (``EMCADDecoder``'s
    ``recompute_stages``; 0: none), with ``recompute_encoder`` the encoder's too (``nnunet_emcad.model.encoders``).
    The decoder stages at strides up to ``mscb_only_stride`` leave CAB and SAB out (``mscb_only_stages``).
    ``decoder_norm='batch'`` keeps the official BatchNorm in the decoder blocks; ``'plan'`` uses the plan's
    norm (instance norm in nnU-Net's plans), whose statistics do not depend on the batch.
    """
    if decoder_norm not in ('batch', 'plan'):
        raise ValueError(f"decoder_norm must be 'batch' or 'plan', got {decoder_norm!r}")
    kw = resolve_arch_kwargs(arch_kwargs, arch_kwargs_req_import)
    recompute_stages = stages_up_to_stride(kw['strides'], recompute_stride)
    enc = build_nnunet_encoder(kw, input_channels, encoder, recompute_stages if recompute_encoder else 0)
    decoder_kwargs.setdefault('axes', [[k > 1 for k in ks] for ks in kw['kernel_sizes']])
    decoder_kwargs['first_stage'] = decoded_first_stage(kw['strides'], decoder_stride)
    decoder_kwargs['recompute_stages'] = recompute_stages
    decoder_kwargs['mscb_only_stages'] = stages_up_to_stride(kw['strides'], mscb_only_stride)
    if decoder_norm == 'plan':
        decoder_kwargs['norm_op'] = plan_norm(kw)
    return EMCADNet(enc, num_classes, deep_supervision, 'first', **decoder_kwargs)
