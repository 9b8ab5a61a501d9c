"""EMCAD over nnU-Net's own encoders, at the encoder's widths down to stride 1 (nnunet-emcad 0.1's layout):
over the plain encoder, the residual one, and in 3D."""
from nnunet_emcad.nnunet.trainers.base import nnUNetTrainerEMCAD

__all__ = [
    'nnUNetTrainerEMCAD_Stride1', 'nnUNetTrainerEMCAD_ResEnc', 'nnUNetTrainerEMCAD3D', 'nnUNetTrainerEMCAD3D_ResEnc',
]


class nnUNetTrainerEMCAD_Stride1(nnUNetTrainerEMCAD):
    """The paper's EMCAD decoder at every stage of the plan's own encoder, down to stride 1, at the encoder's
    widths: the default of nnunet-emcad 0.1 (its models load here; ``nnunet-emcad rename-trainer`` moves one
    trained as ``nnUNetTrainerEMCAD`` then). Every encoder stage gets a head (the deepest not trained, as in
``nnUNetTrainerEMCAD``).

    The decoder stages at strides 1, 2 and 4 run again in backward instead of keeping their activations
    (``recompute_stride``): the same outputs and gradients for a fraction of the training memory, which the
    cost reports compare with stock nnU-Net's; ``nnUNetTrainerEMCAD_NoRecompute`` keeps them. The encoder's
    stages keep theirs, as in stock nnU-Net (``recompute_encoder`` runs them again too). Every trainer that
    decodes at the encoder's widths derives from this one.
    """

    decoder_stride = 1
    decoder_width = None
    recompute_stride = 4


class nnUNetTrainerEMCAD_ResEnc(nnUNetTrainerEMCAD_Stride1):
    """``nnUNetTrainerEMCAD_Stride1`` over nnU-Net's residual encoder, from ResEnc plans (``-p
    nnUNetResEncUNetMPlans`` / ``L``) or, with the default plans, with the ResEnc planners' blocks per stage.
    Self-configuring, trained from scratch. The encoder's stages at strides 1, 2 and 4 run again in backward too
    (their activations are most of its training memory). It keeps 0.1's layout, ``_Stride1``'s, not the default's
    narrow stride-2 one."""

    encoder_kind = 'residual'
    recompute_encoder = True


class nnUNetTrainerEMCAD3D(nnUNetTrainerEMCAD_Stride1):
    """EMCAD beyond the paper, in 3D: ``nnUNetTrainerEMCAD_Stride1``'s decoder over the plan's own 3D encoder
    (``3d_fullres``, ``3d_lowres``).

    Every block is built with ``Conv3d``; the decoder's kernels follow the plan's per-stage kernel sizes (an
    anisotropic stage with kernel (1, 3, 3) gets MSDC kernels (1, k, k), LGAG and EUCB (1, 3, 3); SAB, shared by
    all stages, follows the first stage: (1, 7, 7)), and EUCB upsamples by the plan's per-axis strides.
    nnU-Net's recipe, trained from scratch, instance norm in the decoder (see ``nnUNetTrainerEMCAD``). It keeps
    0.1's layout, ``_Stride1``'s; the 2D default's narrow stride-2 layout in 3D is
    ``nnUNetTrainerEMCAD3D_Stride2Narrow``, an ablation until accuracy runs in 3D decide between them.
    """

    dimensions = 3


class nnUNetTrainerEMCAD3D_ResEnc(nnUNetTrainerEMCAD3D):
    """3D EMCAD over nnU-Net's residual encoder (ResEnc plans, or the default plans with ResEnc M's blocks);
    its encoder's stages at strides up to 4 run again in backward too, as in ``nnUNetTrainerEMCAD_ResEnc``."""

    encoder_kind = 'residual'
    recompute_encoder = True
