"""EMCAD networks: the EMCAD decoder over a PVTv2 encoder (timm) or over any encoder that returns its stages.

Layout follows timm: the decoder, the encoders, the network, then the constructors. Building the decoder over
nnU-Net's own encoders from a plans file is ``nnunet_emcad.nnunet.plans``' work. Every network here keeps
nnU-Net's contract: ``network.decoder.deep_supervision`` switches between a list of outputs (highest resolution
first) and one full-resolution tensor, which is what ``nnUNetTrainer.set_deep_supervision_enabled`` sets.
"""
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Type, Union

import timm
import torch
import torch.nn.functional as F
from timm.models import FeatureListNet
from torch import nn
from torch.nn.modules.conv import _ConvNd

from nnunet_emcad.model.blocks import (CAB, EUCB, LGAG, MSCB, SAB, LogitRefinement, NormFactory, along_axes,
                                       init_emcad_weights, require_no_running_stats, run_stage)
from nnunet_emcad.model.checkpoints import check_state_dict, load_pvt_v2_weights

# (stage-1 width, blocks per stage) of each PVTv2 variant, as timm and the original PVT code define them.
PVT_V2_VARIANTS = {
    'pvt_v2_b0': (32, (2, 2, 2, 2)),
    'pvt_v2_b1': (64, (2, 2, 2, 2)),
    'pvt_v2_b2': (64, (3, 4, 6, 3)),
    'pvt_v2_b3': (64, (3, 4, 18, 3)),
    'pvt_v2_b4': (64, (3, 8, 27, 3)),
    'pvt_v2_b5': (64, (3, 6, 40, 3)),
}
PVT_V2_STRIDE = 32
# each PVTv2 stage's stride into it: stages at 4, 8, 16 and 32
PVT_V2_STRIDES = ((4, 4), (2, 2), (2, 2), (2, 2))

StrideT = Union[int, Sequence[int]]


def total_strides(strides: Sequence[StrideT]) -> List[Tuple[int, ...]]:
    """Each stage's stride relative to the input, from the per-stage strides (an int or one per axis)."""
    totals, total = [], None
    for s in strides:
        s = (s,) if isinstance(s, int) else tuple(s)
        total = s if total is None else tuple(a * b for a, b in zip(total, s))
        totals.append(total)
    return totals


def stages_up_to_stride(strides: Sequence[StrideT], stride: int) -> int:
    """How many of the shallowest stages have a total stride (along their most-strided axis) of at most
    ``stride``; 0 for stride 0."""
    return sum(1 for total in total_strides(strides) if max(total) <= stride)


class EMCADDecoder(nn.Module):
    """The EMCAD decoder over any number of encoder stages, with one segmentation head per stage.

    Stage widths are the encoder's own (``channels``, shallowest first), as in the official code: the LGAG gate
    compares the upsampled decoder feature with the skip channel for channel, so keeping the encoder's width
    needs no projection, and it keeps the decoder's cost a fixed small fraction of the encoder's. ``strides[i]``
    is the encoder's stride into stage ``i``; EUCB ``i`` upsamples stage ``i + 1`` by ``strides[i + 1]``.

    Deepest stage: ``d = MSCB(SAB(d) * d)`` after ``d = CAB(x) * x``. Every shallower stage: ``u = EUCB(d)``,
    ``d = u + LGAG(g=u, x=skip)``, then CAB, SAB (one module shared by all stages) and MSCB.
    ``forward`` returns the head logits at each stage's own resolution, shallowest first (only the first
    when ``deep_supervision`` is off). ``axes[i]`` says along which axes stage ``i`` convolves (an anisotropic
    3D plan's kernel (1, 3, 3) -> (False, True, True)); the blocks' kernels are 1 along the other axes (SAB,
    shared by all stages, follows the shallowest that attends). None: every kernel is isotropic, as in the paper.

    ``first_stage`` is the shallowest stage decoded with the full stage (CAB, SAB, MSCB); the paper decodes
    from every PVT stage (0). Shallower stages are left out (their skips unused; the first head is then at
    ``first_stage``'s resolution), or, with ``light_stages``, decoded by EUCB and LGAG alone, each with a head.
    ``width`` (EffiDec3D's one decoder width, not in EMCAD) projects every decoded skip to ``width`` channels
    (1x1 conv) and decodes all stages at that width; None keeps the encoder's. ``refine_channels`` (not in
    EMCAD) adds, when the decoder starts below stage 0, a ``LogitRefinement`` of that many channels: the first
    head's logits, interpolated to stage 0's size and corrected from stage 0's skip, become the first output.
    ``mscb_only_stages`` (not in EMCAD) leaves CAB and SAB out of the shallowest that many stages: MSCB alone
    refines them (0: every full stage attends, as in the paper; the deepest stage always does). ``gate_norm``
    False (not in EMCAD) leaves every LGAG's gate map unnormalised (``LGAG``).
    ``recompute_stages`` trades compute for training memory: the shallowest ``recompute_stages`` stages (EUCB,
    LGAG, CAB, SAB, MSCB: most of the decoder's activations, at the finest resolutions) keep only their inputs
    for backward and run again there (``torch.utils.checkpoint``), with the same values and gradients. It needs
    norms without running statistics, which a second forward pass would update twice.
    """

    def __init__(self, channels: Sequence[int], strides: Sequence[StrideT], num_classes: int,
                 deep_supervision: bool = True, kernel_sizes: Sequence[int] = (1, 3, 5), expansion_factor: int = 2,
                 dw_parallel: bool = True, add: bool = True, lgag_ks: int = 3, activation: str = 'relu6',
                 conv_op: Type[_ConvNd] = nn.Conv2d, norm_op: NormFactory = None,
                 axes: Optional[Sequence[Sequence[bool]]] = None, first_stage: int = 0, light_stages: bool = False,
                 recompute_stages: int = 0, width: Optional[int] = None, refine_channels: int = 0,
                 mscb_only_stages: int = 0, gate_norm: bool = True):
        super().__init__()
        if len(channels) != len(strides):
            raise ValueError(f"need one stride per stage: {len(channels)} channels, {len(strides)} strides")
        n = len(channels)
        if not 0 <= first_stage < n:
            raise ValueError(f"first_stage must name one of the {n} stages, got {first_stage}")
        self.deep_supervision = deep_supervision
        self.first_stage = first_stage
        self.first_output_stage = 0 if light_stages else first_stage
        if refine_channels and self.first_output_stage == 0:
            raise ValueError("refine_channels refines the logits of a decoder that starts below stage 0; with "
                             "first_stage 0 or light_stages there is nothing to refine: set it to 0")
        if not 0 <= mscb_only_stages < n:
            raise ValueError(f"mscb_only_stages must leave the deepest of the {n} stages its attention, got "
                             f"{mscb_only_stages}")
        self.recompute_stages = recompute_stages
        self.first_attention_stage = max(first_stage, mscb_only_stages)
        axes = list(axes) if axes is not None else [None] * n
        decoded = range(self.first_output_stage, n)
        self.project = nn.ModuleList([conv_op(channels[i], width, 1) for i in decoded]) if width else None
        skip_channels, channels = channels, [width] * n if width else channels
        full, upsampled = range(first_stage, n), range(self.first_output_stage, n - 1)
        self.mscb = nn.ModuleList([
            MSCB(channels[i], channels[i], [along_axes(k, axes[i]) for k in kernel_sizes], expansion_factor,
                 dw_parallel, add, activation, conv_op, norm_op)
            for i in full])
        self.eucb = nn.ModuleList([
            EUCB(channels[i + 1], channels[i], strides[i + 1], along_axes(3, axes[i]), conv_op, norm_op)
            for i in upsampled])
        self.lgag = nn.ModuleList([LGAG(channels[i], along_axes(lgag_ks, axes[i]), conv_op, norm_op, gate_norm)
                                   for i in upsampled])
        self.cab = nn.ModuleList([CAB(channels[i], conv_op=conv_op) for i in range(self.first_attention_stage, n)])
        self.sab = SAB(along_axes(7, axes[self.first_attention_stage]), conv_op=conv_op)
        for part in (self.mscb, self.eucb, self.lgag, self.cab, self.sab):
            part.apply(init_emcad_weights)
        self.seg_layers = nn.ModuleList([conv_op(channels[i], num_classes, 1) for i in decoded])
        self.refine = (LogitRefinement(skip_channels[0], num_classes, refine_channels, along_axes(3, axes[0]),
                                       conv_op, norm_op) if refine_channels else None)
        if recompute_stages:
            require_no_running_stats(self, "use instance norm (norm_op, or decoder_norm='plan' from plans) or "
                                           "recompute nothing (recompute_stages, or recompute_stride from plans, 0)")

    def _attend(self, d: torch.Tensor, stage: int) -> torch.Tensor:
        if stage >= self.first_attention_stage:
            d = self.cab[stage - self.first_attention_stage](d) * d
            d = self.sab(d) * d
        return self.mscb[stage - self.first_stage](d)

    def _decode_stage(self, d: torch.Tensor, skip: torch.Tensor, stage: int) -> torch.Tensor:
        """Stage ``stage`` below the deepest: upsample ``d``, gate ``skip`` with it, then attend (full stages)."""
        u = self.eucb[stage - self.first_output_stage](d)
        d = u + self.lgag[stage - self.first_output_stage](g=u, x=skip)
        return self._attend(d, stage) if stage >= self.first_stage else d

    def forward(self, skips: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        full_resolution = skips[0]
        if self.project is not None:
            skips = [None] * self.first_output_stage + [
                project(s) for project, s in zip(self.project, skips[self.first_output_stage:])]
        d = self._attend(skips[-1], len(skips) - 1)
        features = [d]
        recompute = self.training and torch.is_grad_enabled()
        for stage in range(len(skips) - 2, self.first_output_stage - 1, -1):
            d = run_stage(self._decode_stage, d, skips[stage], stage,
                          recompute=recompute and stage < self.recompute_stages)
            features.append(d)
        features.reverse()
        heads = self.seg_layers if self.deep_supervision else self.seg_layers[:1]
        logits = [head(f) for head, f in zip(heads, features)]
        if self.refine is not None:
            logits.insert(0, self.refine(logits[0], full_resolution))
        return logits if self.deep_supervision else logits[:1]


class PVTv2Encoder(nn.Module):
    """A timm PVTv2 (b0..b5) feature extractor: four stages at strides 4, 8, 16, 32.

    ``grey_stem=True`` is the official grey-scale input: conv 1x1 (1 -> 3) + BN + ReLU in front of a 3-channel
    PVT, applied when the input has one channel (so ImageNet weights keep their RGB patch embedding).
    Otherwise timm's ``in_chans`` takes ``in_channels`` directly. ``pretrained`` is a local checkpoint (path or
    state dict; timm or original PVT key names) loaded strictly before timm's feature wrapper is applied.
    The first ``recompute_stages`` stages use timm's gradient checkpointing: their transformer blocks run again
    in backward instead of keeping their activations (the same outputs and gradients for less training memory).
    """

    def __init__(self, variant: str = 'pvt_v2_b2', in_channels: int = 3, grey_stem: Optional[bool] = None,
                 pretrained: Union[None, str, Dict[str, torch.Tensor]] = None, drop_path_rate: float = 0.1,
                 recompute_stages: int = 0):
        super().__init__()
        if variant not in PVT_V2_VARIANTS:
            raise ValueError(f"unknown PVTv2 encoder {variant!r}; choose one of {', '.join(PVT_V2_VARIANTS)}")
        if grey_stem is None:
            grey_stem = in_channels == 1
        if grey_stem and in_channels not in (1, 3):
            raise ValueError(f"the grey-scale stem takes 1-channel input, got {in_channels} channels; "
                             f"use grey_stem=False to let timm's in_chans take them")
        self.variant = variant
        self.in_channels = in_channels
        self.drop_path_rate = drop_path_rate
        self.recompute_stages = recompute_stages
        self.stem = nn.Sequential(nn.Conv2d(1, 3, 1), nn.BatchNorm2d(3), nn.ReLU(inplace=True)) if grey_stem else None
        self.body = self._build_body(pretrained)
        self.output_channels = list(self.body.feature_info.channels())
        self.strides = [list(s) for s in PVT_V2_STRIDES]
        self.conv_op = nn.Conv2d

    def _build_body(self, pretrained: Union[None, str, Dict[str, torch.Tensor]]) -> nn.Module:
        """timm's model, with ``pretrained`` loaded strictly, wrapped as timm's ``features_only`` does."""
        model = timm.create_model(self.variant, pretrained=False, num_classes=0, drop_path_rate=self.drop_path_rate,
                                  in_chans=3 if self.stem is not None else self.in_channels)
        if pretrained is not None:
            load_pvt_v2_weights(model, pretrained)
        for i, stage in enumerate(model.stages):
            stage.grad_checkpointing = i < self.recompute_stages
        return FeatureListNet(model, out_indices=(0, 1, 2, 3), flatten_sequential=True)

    def load_pretrained(self, source: Union[str, Dict[str, torch.Tensor]]) -> None:
        """Load ImageNet PVTv2 weights (timm or original PVT names) strictly into this encoder."""
        self.body.load_state_dict(self._build_body(source).state_dict())

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        if any(s % PVT_V2_STRIDE for s in x.shape[2:]):
            raise ValueError(f"PVTv2 encoders need spatial sizes divisible by {PVT_V2_STRIDE}, got "
                             f"{tuple(x.shape[2:])}; pad or crop the input (in nnU-Net: the patch size)")
        if self.stem is not None and x.shape[1] == 1:
            x = self.stem(x)
        return self.body(x)


class EMCADNet(nn.Module):
    """An encoder (returning its stages' features, shallowest first) with the EMCAD decoder and heads.

    The encoder must expose ``output_channels`` and ``strides`` like dynamic-network-architectures' encoders.
    ``upsample_outputs='first'`` brings only the first output to the input size (nnU-Net's deep supervision
    then sees every other head at its own scale); ``'all'`` upsamples every head to the input size, as the
    official code does for its MUTATION loss. ``weights_fix`` ends the message of a strict load that does not
    fit; a framework building this network sets it to the fix in its own terms.
    """

    weights_fix = 'Load weights saved from a network built with the same settings.'

    def __init__(self, encoder: nn.Module, num_classes: int, deep_supervision: bool = True,
                 upsample_outputs: str = 'first', **decoder_kwargs):
        super().__init__()
        if upsample_outputs not in ('first', 'all'):
            raise ValueError(f"upsample_outputs must be 'first' or 'all', got {upsample_outputs!r}")
        self.encoder = encoder
        self.upsample_outputs = upsample_outputs
        self.decoder = EMCADDecoder(encoder.output_channels, encoder.strides, num_classes, deep_supervision,
                                    conv_op=encoder.conv_op, **decoder_kwargs)

    def decode(self, skips: Sequence[torch.Tensor],
               output_size: Sequence[int]) -> Union[torch.Tensor, List[torch.Tensor]]:
        """Decoder and heads on given encoder features; outputs as ``forward`` returns them."""
        logits = self.decoder(skips)
        mode = 'bilinear' if len(output_size) == 2 else 'trilinear'
        size = tuple(output_size)
        last = len(logits) if self.upsample_outputs == 'all' else 1
        logits = [F.interpolate(o, size=size, mode=mode, align_corners=False)
                  if i < last and tuple(o.shape[2:]) != size else o for i, o in enumerate(logits)]
        return logits if self.decoder.deep_supervision else logits[0]

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, List[torch.Tensor]]:
        return self.decode(self.encoder(x), x.shape[2:])

    def output_strides(self) -> List[Tuple[int, ...]]:
        """Each output's stride relative to the input, highest resolution first (the first output is full size)."""
        totals = total_strides(self.encoder.strides)
        refined = totals[:1] if self.decoder.refine is not None else []
        strides = refined + totals[self.decoder.first_output_stage:]
        upsampled = len(strides) if self.upsample_outputs == 'all' else 1
        return [tuple(1 for _ in s) if i < upsampled else s for i, s in enumerate(strides)]

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``; weights of another network fail with what they and this are, and
        ``weights_fix`` (what whoever built this network tells its users to do about it)."""
        if strict:
            own = self.state_dict()
            check_state_dict(own, state_dict, f"weights of {describe_weights(state_dict)}",
                             f"This network is {describe_weights(own)}. {self.weights_fix}")
        return super().load_state_dict(state_dict, strict, assign)


def describe_weights(state_dict: Mapping[str, torch.Tensor]) -> str:
    """What kind of segmentation network a state dict belongs to, from its key names."""
    keys = list(state_dict)
    if any(k.startswith('decoder.mscb.') for k in keys):
        pvt = any(k.startswith('encoder.body.') for k in keys)
        return 'EMCAD with a PVTv2 encoder' if pvt else 'EMCAD over an nnU-Net encoder'
    if any(k.startswith('decoder.stages.') for k in keys):
        return "a stock nnU-Net U-Net (nnU-Net's own decoder)"
    return 'an unknown network'


def create_emcad_pvt(variant: str = 'pvt_v2_b2', num_classes: int = 9, in_channels: int = 3,
                     grey_stem: Optional[bool] = None, pretrained: Union[None, str, Dict[str, torch.Tensor]] = None,
                     deep_supervision: bool = True, upsample_outputs: str = 'first', drop_path_rate: float = 0.1,
                     recompute_stride: int = 0, recompute_encoder: bool = False, **decoder_kwargs) -> EMCADNet:
    """EMCAD over a timm PVTv2 encoder (the paper's models are b0 and b2). The decoder stages at strides up to
    ``recompute_stride`` run again in backward (``EMCADDecoder``'s ``recompute_stages``; 0: none), with
    ``recompute_encoder`` the encoder's too (``PVTv2Encoder``'s); ``decoder_kwargs`` go to ``EMCADDecoder``."""
    recompute_stages = stages_up_to_stride(PVT_V2_STRIDES, recompute_stride)
    encoder = PVTv2Encoder(variant, in_channels, grey_stem, pretrained, drop_path_rate,
                           recompute_stages if recompute_encoder else 0)
    return EMCADNet(encoder, num_classes, deep_supervision, upsample_outputs, recompute_stages=recompute_stages,
                    **decoder_kwargs)


def emcad_pvt_v2_b0(num_classes: int = 9, in_channels: int = 3, **kwargs) -> EMCADNet:
    """EMCAD-B0 of the paper: PVTv2-b0 encoder, decoder widths 256, 160, 64, 32."""
    return create_emcad_pvt('pvt_v2_b0', num_classes, in_channels, **kwargs)


def emcad_pvt_v2_b2(num_classes: int = 9, in_channels: int = 3, **kwargs) -> EMCADNet:
    """EMCAD-B2 of the paper: PVTv2-b2 encoder, decoder widths 512, 320, 128, 64."""
    return create_emcad_pvt('pvt_v2_b2', num_classes, in_channels, **kwargs)
