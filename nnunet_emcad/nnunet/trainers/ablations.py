"""Ablations: trainers that exist to be measured against the default and each other (their runs:
docs/results.md), not to be picked. Each changes one thing of ``nnUNetTrainerEMCAD`` or of
``nnUNetTrainerEMCAD_Stride1``; nnU-Net finds them by name like any other trainer."""
from nnunet_emcad.nnunet.trainers.base import nnUNetTrainerEMCAD
from nnunet_emcad.nnunet.trainers.nnunet_encoder import nnUNetTrainerEMCAD_Stride1

__all__ = [
    'nnUNetTrainerEMCAD_NoRecompute', 'nnUNetTrainerEMCAD_Stride4', 'nnUNetTrainerEMCAD_Stride4Light',
    'nnUNetTrainerEMCAD_Stride2', 'nnUNetTrainerEMCAD_Stride2Refine', 'nnUNetTrainerEMCAD_AllHeads',
    'nnUNetTrainerEMCAD_Stride2Narrow', 'nnUNetTrainerEMCAD_Stride2NarrowRefine', 'nnUNetTrainerEMCAD_Expansion1',
    'nnUNetTrainerEMCAD_Kernel3', 'nnUNetTrainerEMCAD_NoFineAttention', 'nnUNetTrainerEMCAD_Lean',
    'nnUNetTrainerEMCAD3D_Stride2Narrow', 'nnUNetTrainerEMCAD_GateNoNorm',
]


class nnUNetTrainerEMCAD_NoRecompute(nnUNetTrainerEMCAD_Stride1):
    """``nnUNetTrainerEMCAD_Stride1`` keeping every decoder activation for backward: a faster training step for
    several times the training memory (both measured in the cost report); for a GPU with memory to spare."""

    recompute_stride = 0


class nnUNetTrainerEMCAD_Stride4(nnUNetTrainerEMCAD_Stride1):
    """The paper's decoder layout over the plan's encoder: EMCAD decodes from the stage at stride 4 (as it
    decodes a PVT's four stages), and the logits are upsampled bilinearly to the patch, as the official code
    does; the encoder's stride-1 and stride-2 features are not used by the decoder. Its finest stage runs
    again in backward, as in ``nnUNetTrainerEMCAD_Stride1``."""

    decoder_stride = 4


class nnUNetTrainerEMCAD_Stride4Light(nnUNetTrainerEMCAD_Stride4):
    """``nnUNetTrainerEMCAD_Stride4`` with light stages at strides 2 and 1: EUCB upsamples and LGAG gates the
    encoder's skip there (no CAB, SAB or MSCB), each with a head, so the logits come at full resolution."""

    light_stages = True


class nnUNetTrainerEMCAD_Stride2(nnUNetTrainerEMCAD_Stride1):
    """EMCAD decoding from stride 2 at the encoder's widths, as EffiDec3D (the authors' CVPR 2025 follow-up)
    decodes by default: the stride-2 stage's logits are interpolated to the patch (bilinear, trilinear in 3D)
    and the encoder's stride-1 features are not used by the decoder (``nnUNetTrainerEMCAD`` also narrows it)."""

    decoder_stride = 2


class nnUNetTrainerEMCAD_Stride2Refine(nnUNetTrainerEMCAD_Stride2):
    """``nnUNetTrainerEMCAD_Stride2`` with a full-resolution refinement (in neither EMCAD nor EffiDec3D): the
    interpolated logits and the encoder's stride-1 features go through a 3x3 convolution to 8 channels and a 1x1
    one back to the classes, added to the logits (``blocks.LogitRefinement``), so the stride-1 skip can sharpen
    what interpolation blurs. The refined logits are the first output; the stride-2 head stays supervised at its
    own scale."""

    refine_channels = 8


class nnUNetTrainerEMCAD_AllHeads(nnUNetTrainerEMCAD):
    """``nnUNetTrainerEMCAD`` training its deepest head too, with its share of nnU-Net's halving weights (as the
    paper supervises every head) instead of nnU-Net's 0: an ablation (its runs: docs/results.md)."""

    train_deepest_head = True


class nnUNetTrainerEMCAD_Stride2Narrow(nnUNetTrainerEMCAD):
    """``nnUNetTrainerEMCAD`` under the name it was measured with before it became the default (the benchmark
    reports name it); its models and ``nnUNetTrainerEMCAD``'s are the same network."""


class nnUNetTrainerEMCAD_Stride2NarrowRefine(nnUNetTrainerEMCAD):
    """``nnUNetTrainerEMCAD`` with ``nnUNetTrainerEMCAD_Stride2Refine``'s full-resolution refinement."""

    refine_channels = 8


class nnUNetTrainerEMCAD_Expansion1(nnUNetTrainerEMCAD):
    """``nnUNetTrainerEMCAD`` whose MSCBs expand their input width by 1 (no expansion) instead of the paper's 2:
    half the width of every MSCB's inner point-wise and depth-wise convolutions."""

    mscb_expansion_factor = 1


class nnUNetTrainerEMCAD_Kernel3(nnUNetTrainerEMCAD):
    """``nnUNetTrainerEMCAD`` whose MSCBs convolve with one depth-wise 3x3 kernel instead of the paper's three
    parallel ones (1x1, 3x3, 5x5, added)."""

    mscb_kernel_sizes = (3,)


class nnUNetTrainerEMCAD_NoFineAttention(nnUNetTrainerEMCAD):
    """``nnUNetTrainerEMCAD`` without CAB and SAB at its finest stage (stride 2): there MSCB alone refines the
    gated sum of the upsampled feature and the skip; the coarser stages attend as in the paper."""

    mscb_only_stride = 2


class nnUNetTrainerEMCAD_Lean(nnUNetTrainerEMCAD):
    """``nnUNetTrainerEMCAD`` with the three fine-stage savings together: MSCBs without expansion and with one
    3x3 kernel (``_Expansion1``, ``_Kernel3``), no CAB or SAB at stride 2 (``_NoFineAttention``)."""

    mscb_expansion_factor = 1
    mscb_kernel_sizes = (3,)
    mscb_only_stride = 2


class nnUNetTrainerEMCAD3D_Stride2Narrow(nnUNetTrainerEMCAD):
    """``nnUNetTrainerEMCAD`` in 3D (EffiDec3D is a 3D decoder): ``nnUNetTrainerEMCAD3D``'s blocks decoding from
    stride 2 (along the most-strided axis) at one width, 32."""

    dimensions = 3


class nnUNetTrainerEMCAD_GateNoNorm(nnUNetTrainerEMCAD):
    """``nnUNetTrainerEMCAD`` whose LGAG gates are not normalised before their sigmoid: with the plan's instance
    norm every image's one-channel gate map is centred there, where the official BatchNorm centres it over the
    batch (``blocks.LGAG``'s ``gate_norm``)."""

    lgag_gate_norm = False
