"""nnU-Net v2 trainers for EMCAD. Each one overrides only what it changes; nnU-Net keeps planning,
preprocessing, augmentation, cross-validation, validation, evaluation, ensembling and postprocessing.

``build_network_architecture`` is a classmethod here (so a variant changes a class attribute, not the method);
nnU-Net calls it with the same arguments as the stock static method, in training and in the predictor. It
never reads files: ImageNet weights are loaded when a new training starts, never for ``--c`` or ``--val``.
"""
import math
import os
import zipfile
from typing import List, Optional, Union

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch._dynamo import OptimizedModule
from torch.nn.parallel import DistributedDataParallel as DDP

from nnunetv2 import paths as nnunet_paths
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.file_path_utilities import get_output_folder
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from nnunet_emcad.model.checkpoints import TIMM_PRETRAINED, CheckpointError, StateDict, timm_pretrained_weights
from nnunet_emcad.model.emcad import PVT_V2_STRIDE, EMCADNet, create_emcad_pvt
from nnunet_emcad.nnunet.losses import FirstTargetLoss, MutationLoss, PaperDiceCELoss
from nnunet_emcad.nnunet.plans import (configuration_arch_kwargs, configuration_encoder_kind, create_emcad_unet,
                                       plan_norm)
from nnunet_emcad.nnunet.short_training import Schedule, short_schedule

__all__ = [
    'nnUNetTrainerEMCAD', 'nnUNetTrainerEMCAD_Stride1', 'nnUNetTrainerEMCAD_NoRecompute', 'nnUNetTrainerEMCAD_ResEnc',
    'nnUNetTrainerEMCAD_Stride4', 'nnUNetTrainerEMCAD_Stride4Light', 'nnUNetTrainerEMCAD_Stride2',
    'nnUNetTrainerEMCAD_Stride2Refine', 'nnUNetTrainerEMCAD_AllHeads', 'nnUNetTrainerEMCAD_Stride2Narrow',
    'nnUNetTrainerEMCAD_Stride2NarrowRefine', 'nnUNetTrainerEMCAD_Expansion1', 'nnUNetTrainerEMCAD_Kernel3',
    'nnUNetTrainerEMCAD_NoFineAttention', 'nnUNetTrainerEMCAD_Lean', 'nnUNetTrainerEMCAD3D',
    'nnUNetTrainerEMCAD3D_ResEnc', 'nnUNetTrainerEMCAD3D_Stride2Narrow',
    'nnUNetTrainerEMCAD_PVTb0', 'nnUNetTrainerEMCAD_PVTb2', 'nnUNetTrainerEMCAD_PVTb2_MUTATION',
    'nnUNetTrainerEMCAD_5epochs', 'nnUNetTrainerEMCAD_PVTb0_5epochs', 'nnUNetTrainerEMCAD_smoke',
    'nnUNetTrainerEMCAD3D_smoke', 'nnUNetTrainerEMCAD_PVTb0_smoke', 'nnUNetTrainerEMCAD_PVTb0_500it',
]

PVT_WEIGHTS_ENV = 'nnUNet_EMCAD_PVT_WEIGHTS'
WEIGHTS_FIX = 'Use the trainer (-tr), plans (-p) and configuration (-c) the checkpoint was trained with.'
# Trainer names of nnunet-emcad 0.1 whose network is another trainer's now: the default's layout changed in 0.2, and
# with it its short schedules'.
RENAMED_TRAINERS = dict.fromkeys(('nnUNetTrainerEMCAD', 'nnUNetTrainerEMCAD_5epochs', 'nnUNetTrainerEMCAD_smoke'),
                                 'nnUNetTrainerEMCAD_Stride1')
# The PVT trainers' smallest patch per axis: the deepest stage (1/32) then has more than one position to normalise.
PVT_MIN_PATCH = 2 * PVT_V2_STRIDE
# nnUNetTrainerEMCAD's decoder-layout attributes, each with the one value the PVT trainers build: the paper's decoder
# over PVTv2's four stages (strides 4 to 32, at PVTv2's widths).
PVT_DECODER_LAYOUT = {'encoder_kind': None, 'decoder_stride': 4, 'light_stages': False, 'decoder_width': None,
                      'refine_channels': 0, 'mscb_kernel_sizes': (1, 3, 5), 'mscb_expansion_factor': 2,
                      'mscb_only_stride': 0}


def require_dimensions(configuration_manager: ConfigurationManager, trainer_name: str, dimensions: int) -> None:
    """Stop with a message naming the fix when a trainer is given a configuration of the other dimension."""
    patch = configuration_manager.patch_size
    if len(patch) == dimensions:
        return
    if dimensions == 2:
        raise RuntimeError(f"{trainer_name} is a 2D trainer, but this configuration is {len(patch)}D (patch size "
                           f"{list(patch)}). Train it on the 2d configuration: nnUNetv2_train DATASET 2d FOLD "
                           f"-tr {trainer_name}; for 3d_fullres / 3d_lowres use nnUNetTrainerEMCAD3D (or "
                           f"nnUNetTrainerEMCAD3D_ResEnc)")
    raise RuntimeError(f"{trainer_name} is a 3D trainer, but this configuration is {len(patch)}D (patch size "
                       f"{list(patch)}). Train it on 3d_fullres or 3d_lowres, or use nnUNetTrainerEMCAD for 2d")


def check_nnunet_folders() -> None:
    """Stop with the fix when nnUNet_preprocessed or nnUNet_results is unset, or nnUNet_results cannot be
    written (training reads the preprocessed data and writes the results)."""
    for var in ('nnUNet_preprocessed', 'nnUNet_results'):
        if not os.environ.get(var):
            raise RuntimeError(f"{var} is not set: export {var}=/path/to/a/writable/folder (see nnU-Net's "
                               f"documentation on setting up paths)")
    path = existing = os.environ['nnUNet_results']
    while not os.path.exists(existing):
        existing = os.path.dirname(existing) or '.'
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK):
        raise RuntimeError(f"nnUNet_results={path} is not writable ({existing} is read-only or not a folder); "
                           f"training writes there: point nnUNet_results to a writable folder")


def check_checkpoint_file(path: str) -> None:
    """Stop with the fix when ``path`` is not a PyTorch checkpoint (``torch.save`` writes zip archives): a
    damaged, truncated or foreign file would otherwise fail deep inside unpickling."""
    if not zipfile.is_zipfile(path):
        raise RuntimeError(f"{path} is not a readable PyTorch checkpoint (damaged, truncated or another kind of "
                           f"file): copy it again from where it was trained, or train that fold again "
                           f"(nnUNetv2_train)")


def unwrap(network: nn.Module) -> nn.Module:
    """The network inside DDP and torch.compile wrappers."""
    if isinstance(network, DDP):
        network = network.module
    if isinstance(network, OptimizedModule):
        network = network._orig_mod
    return network


def for_nnunet(network: EMCADNet, trainer_name: str) -> EMCADNet:
    """``network`` (``trainer_name``'s) whose weight-mismatch message names the fix in nnU-Net's terms (its
    predictor and ``--c`` load checkpoints through ``load_state_dict``), and, for a trainer whose network
    changed, where a model trained before the change belongs now."""
    network.weights_fix = WEIGHTS_FIX
    renamed = RENAMED_TRAINERS.get(trainer_name)
    if renamed:
        network.weights_fix += (f" A model trained as {trainer_name} with nnunet-emcad 0.1 holds {renamed}'s "
                                f"network: copy it there (nnunet-emcad rename-trainer MODEL_FOLDER {renamed}) and "
                                f"predict with -tr {renamed}.")
    return network


class nnUNetTrainerEMCAD(nnUNetTrainer):
    """EMCAD's decoder over the plan's own encoder, decoding from stride 2 at one width: the default.

    The decoder layout is EffiDec3D's (the EMCAD authors' CVPR 2025 follow-up), with EMCAD's blocks: the stages
    from stride 2 down are the paper's (MSCB, CAB, SAB, LGAG, EUCB), every encoder feature is projected to one
    width, 32 (the first stage's width in nnU-Net's plans), by a 1x1 convolution, and the stride-2 logits are
    interpolated to the patch (the encoder's stride-1 features are not used by the decoder). It was chosen over
    the full-resolution layout (``nnUNetTrainerEMCAD_Stride1``, the default of nnunet-emcad 0.1) by repeated
    accuracy runs on two data sets with thin structures, and trains in less time than stock nnU-Net (the runs:
    docs/results.md). Its decoder keeps fewer activations than stock nnU-Net's, so no stage runs again in backward.

    The encoder is the one nnU-Net configured (``PlainConvEncoder`` from the default plans, ``ResidualEncoder``
    from ResEnc plans), trained from scratch with nnU-Net's recipe (SGD 0.01, Nesterov, poly decay): it needs no
    ImageNet weights (none can be downloaded at run time, and medical data rarely has three channels), and it
    inherits nnU-Net's self-configured patch, strides and depth for any dataset. Every decoded stage gets a
    head (the official decoder's layout); deep supervision trains them with nnU-Net's weights, which give the
    deepest output 0, as they give stock nnU-Net's coarsest, so that head is not trained
    (``nnUNetTrainerEMCAD_AllHeads`` trains it: an ablation, in docs/results.md).

    The decoder blocks normalise with the plan's norm (instance norm) instead of the official BatchNorm: with
    nnU-Net's small batches BatchNorm's running statistics do not represent the batches it trained on, so the
    same trained weights score far worse in eval mode (running statistics) than with batch statistics.

    Every EMCAD trainer derives from this one; a variant changes the class attributes below.
    """

    encoder_kind: Optional[str] = None  # 'plain' or 'residual'; None follows the plans' architecture class
    dimensions = 2
    decoder_stride = 2  # the finest stride decoded with EMCAD's full stages (plans.create_emcad_unet)
    light_stages = False  # stages finer than decoder_stride decoded by EUCB and LGAG alone (else left out)
    decoder_width: Optional[int] = 32  # one width for every decoder stage (EffiDec3D's); None: the encoder's
    refine_channels = 0  # a LogitRefinement of this width at stride 1 when decoding starts coarser (0: none)
    mscb_kernel_sizes = (1, 3, 5)  # MSCB's depth-wise kernels (the paper's)
    mscb_expansion_factor = 2  # MSCB's expansion of its input width (the paper's)
    mscb_only_stride = 0  # decoder stages at strides up to this leave CAB and SAB out (0: none; the paper's)
    recompute_stride = 0  # decoder stages at strides up to this run again in backward (plans.create_emcad_unet)
    recompute_encoder = False  # the encoder's stages up to recompute_stride too
    train_deepest_head = False  # nnU-Net's deep-supervision weights give the deepest output 0; True: its share
    max_skipped_steps = 20  # steps in a row the GradScaler may skip for non-finite gradients before the run stops

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        # before nnU-Net's __init__, which creates the fold folder and its training log
        check_nnunet_folders()
        require_dimensions(PlansManager(plans).get_configuration(configuration), type(self).__name__,
                           self.dimensions)
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.skipped_steps = 0  # steps the GradScaler skipped in a row
        self.scale_after_last_step: Optional[float] = None  # the GradScaler's scale, read once per step

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        require_dimensions(configuration_manager, cls.__name__, cls.dimensions)
        kind = cls.encoder_kind or configuration_encoder_kind(configuration_manager)
        return for_nnunet(create_emcad_unet(configuration_arch_kwargs(configuration_manager), num_input_channels,
                                            num_output_channels, kind, enable_deep_supervision, decoder_norm='plan',
                                            decoder_stride=cls.decoder_stride, light_stages=cls.light_stages,
                                            recompute_stride=cls.recompute_stride,
                                            recompute_encoder=cls.recompute_encoder, width=cls.decoder_width,
                                            refine_channels=cls.refine_channels,
                                            kernel_sizes=cls.mscb_kernel_sizes,
                                            expansion_factor=cls.mscb_expansion_factor,
                                            mscb_only_stride=cls.mscb_only_stride), cls.__name__)

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        """nnU-Net's loading (``--c``, ``--val``), after checking that a file is a checkpoint at all."""
        if isinstance(filename_or_checkpoint, str):
            check_checkpoint_file(filename_or_checkpoint)
        super().load_checkpoint(filename_or_checkpoint)

    def train_step(self, batch: dict) -> dict:
        """nnU-Net's step; stops the run when the loss stops being finite, or when the GradScaler has skipped
        ``max_skipped_steps`` steps in a row for non-finite gradients, instead of saving a network that did not
        learn. It reads the loss nnU-Net has moved to the CPU and the GradScaler's scale once per step.

        Under DDP every rank stops at the same step with the same message. The ranks' gradients are averaged, so
        a non-finite loss on one rank makes every rank's GradScaler skip the step, and the GradScalers' skips
        agree: the ranks gather their losses at a skipped step only; a step the GradScaler took had finite
        gradients on every rank. Without a GradScaler (nnU-Net's DDP makes one on CUDA) they gather every step."""
        if self.grad_scaler is not None and self.scale_after_last_step is None:
            self.scale_after_last_step = self.grad_scaler.get_scale()
        result = super().train_step(batch)
        skipped = False
        if self.grad_scaler is not None:
            scale, self.scale_after_last_step = self.scale_after_last_step, self.grad_scaler.get_scale()
            skipped = self.scale_after_last_step < scale
        loss = float(result['loss'])
        if not self.is_ddp:
            losses = [loss]
        else:
            losses = self._every_ranks_loss(loss) if skipped or self.grad_scaler is None else []
        diverged = [rank for rank, value in enumerate(losses) if not math.isfinite(value)]
        if diverged:
            where = (f" on rank{'s' if len(diverged) > 1 else ''} {', '.join(map(str, diverged))}" if self.is_ddp
                     else '')
            self._stop(f"training loss became {losses[diverged[0]]}{where} in epoch {self.current_epoch}: the "
                       f"network diverged, and continuing would only save a broken model. Lower initial_lr or "
                       f"check the data; the last good checkpoints are in {self.output_folder}")
        if self.grad_scaler is not None:
            self.skipped_steps = self.skipped_steps + 1 if skipped else 0
            if self.skipped_steps >= self.max_skipped_steps:
                self._stop(self._skipped_steps_message())
        return result

    def _every_ranks_loss(self, loss: float) -> List[float]:
        """This step's loss of every DDP rank, in rank order."""
        mine = torch.tensor([loss], device=self.device)
        gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, mine)
        return [float(g) for g in gathered]

    def _skipped_steps_message(self) -> str:
        latest = os.path.join(self.output_folder, 'checkpoint_latest.pth')
        checkpoint = (f"the last checkpoint is {latest}" if os.path.isfile(latest) else
                      f"no checkpoint was saved yet (nnU-Net saves one every {self.save_every} epochs)")
        compiled = "It runs under torch.compile (nnU-Net's default on CUDA): " if self._do_i_compile() else ''
        return (f"the last {self.skipped_steps} optimiser steps (epoch {self.current_epoch}) were all skipped: "
                f"the gradients were not finite, and the GradScaler's scale fell to "
                f"{self.grad_scaler.get_scale():g}. The network is not learning, and continuing would only save it "
                f"untrained. {compiled}retry with export nnUNet_compile=f (add --c to continue from a "
                f"checkpoint); {checkpoint}")

    def _stop(self, message: str) -> None:
        """End training with ``message``, in the training log too."""
        self.print_to_log_file(message)
        raise RuntimeError(message)

    def _build_loss(self) -> nn.Module:
        """nnU-Net's loss and deep-supervision weights (halving per output from the finest, normalised, the
        deepest output 0, under DDP 1e-6); with ``train_deepest_head`` the deepest output keeps its share."""
        loss = super()._build_loss()
        if self.enable_deep_supervision and self.train_deepest_head:
            weights = np.array([1 / 2 ** i for i in range(len(loss.weight_factors))])
            loss.weight_factors = tuple(weights / weights.sum())
        return loss

    def _get_deep_supervision_scales(self) -> Optional[List[List[float]]]:
        """One scale per network output, read off the network's heads (nnU-Net assumes one less than stages)."""
        if not self.enable_deep_supervision:
            return None
        return [list(1 / np.array(s, dtype=float)) for s in unwrap(self.network).output_strides()]


class nnUNetTrainerEMCAD_Stride1(nnUNetTrainerEMCAD):
    """The paper's EMCAD decoder at every stage of the plan's own encoder, down to stride 1, at the encoder's
    widths: the default of nnunet-emcad 0.1 (its models load here; ``nnunet-emcad rename-trainer`` moves one
    trained as ``nnUNetTrainerEMCAD`` then). Every encoder stage gets a head (the deepest not trained, as in
``nnUNetTrainerEMCAD``).

    The decoder stages at strides 1, 2 and 4 run again in backward instead of keeping their activations
    (``recompute_stride``): the same outputs and gradients for a fraction of the training memory, which the
    cost reports compare with stock nnU-Net's; ``nnUNetTrainerEMCAD_NoRecompute`` keeps them. The encoder's
    stages keep theirs, as in stock nnU-Net (``recompute_encoder`` runs them again too). Every trainer below that
    decodes at the encoder's widths derives from this one.
    """

    decoder_stride = 1
    decoder_width = None
    recompute_stride = 4


class nnUNetTrainerEMCAD_NoRecompute(nnUNetTrainerEMCAD_Stride1):
    """``nnUNetTrainerEMCAD_Stride1`` keeping every decoder activation for backward: a faster training step for
    several times the training memory (both measured in the cost report); for a GPU with memory to spare."""

    recompute_stride = 0


class nnUNetTrainerEMCAD_ResEnc(nnUNetTrainerEMCAD_Stride1):
    """``nnUNetTrainerEMCAD_Stride1`` over nnU-Net's residual encoder, from ResEnc plans (``-p
    nnUNetResEncUNetMPlans`` / ``L``) or, with the default plans, with the ResEnc planners' blocks per stage.
    Self-configuring, trained from scratch. The encoder's stages at strides 1, 2 and 4 run again in backward too
    (their activations are most of its training memory)."""

    encoder_kind = 'residual'
    recompute_encoder = True


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


class nnUNetTrainerEMCAD3D(nnUNetTrainerEMCAD_Stride1):
    """EMCAD beyond the paper, in 3D: ``nnUNetTrainerEMCAD_Stride1``'s decoder over the plan's own 3D encoder
    (``3d_fullres``, ``3d_lowres``).

    Every block is built with ``Conv3d``; the decoder's kernels follow the plan's per-stage kernel sizes (an
    anisotropic stage with kernel (1, 3, 3) gets MSDC kernels (1, k, k), LGAG and EUCB (1, 3, 3); SAB, shared by
    all stages, follows the first stage: (1, 7, 7)), and EUCB upsamples by the plan's per-axis strides.
    nnU-Net's recipe, trained from scratch, instance norm in the decoder (see ``nnUNetTrainerEMCAD``).
    """

    dimensions = 3


class nnUNetTrainerEMCAD3D_ResEnc(nnUNetTrainerEMCAD3D):
    """3D EMCAD over nnU-Net's residual encoder (ResEnc plans, or the default plans with ResEnc M's blocks);
    its encoder's stages at strides up to 4 run again in backward too, as in ``nnUNetTrainerEMCAD_ResEnc``."""

    encoder_kind = 'residual'
    recompute_encoder = True


class nnUNetTrainerEMCAD3D_Stride2Narrow(nnUNetTrainerEMCAD):
    """``nnUNetTrainerEMCAD`` in 3D (EffiDec3D is a 3D decoder): ``nnUNetTrainerEMCAD3D``'s blocks decoding from
    stride 2 (along the most-strided axis) at one width, 32."""

    dimensions = 3


class nnUNetTrainerEMCAD_PVTb2(nnUNetTrainerEMCAD):
    """The paper's EMCAD-B2: PVTv2-b2 encoder (timm), AdamW lr 1e-4, weight decay 1e-4 (the paper's optimiser),
    with nnU-Net's poly decay.

    The decoder normalises with the plan's norm, as in ``nnUNetTrainerEMCAD`` (the reason is there); the
    encoder keeps timm's LayerNorms and the official grey-scale stem. The encoder's and the decoder's stages at
    stride 4 run again in backward (``recompute_stride`` and ``recompute_encoder``; the encoder's through timm's
    gradient checkpointing).

    ImageNet weights: set ``nnUNet_EMCAD_PVT_WEIGHTS`` to a checkpoint file, or to a folder holding
    ``pvt_v2_b2.pth`` (timm or original PVT format); they are loaded strictly when a new training starts (not
    for ``--c`` or ``--val``, whose checkpoint holds the encoder). Unset, the encoder trains from scratch. A
    patch size not divisible by 32 is rounded up to the next multiple of 32, and to at least 64 (the deepest
    stage, at 1/32, then has more than one position for instance norm to normalise); logged, and saved in the
    results' plans.json so prediction uses it too.
    """

    pvt_variant = 'pvt_v2_b2'
    upsample_outputs = 'first'
    decoder_stride = PVT_DECODER_LAYOUT['decoder_stride']
    decoder_width = PVT_DECODER_LAYOUT['decoder_width']
    recompute_stride = 4
    recompute_encoder = True

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        # before nnU-Net's __init__ writes anything: a new training whose weights cannot be had stops here
        self.check_decoder_layout()
        self.pvt_weights, self.pvt_weights_error, self.imagenet_loaded = None, None, False
        if not plans.get('continue_training'):  # --c: the checkpoint brings the weights
            try:
                self.pvt_weights = self._pvt_weights()
            except CheckpointError as e:
                if not self._has_final_checkpoint(plans, configuration, fold):
                    raise
                self.pvt_weights_error = e  # --val needs none; a new training of this fold stops at its start
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = 1e-4
        self.weight_decay = 1e-4
        self._fit_patch_size()

    @classmethod
    def _has_final_checkpoint(cls, plans: dict, configuration: str, fold: Union[int, str]) -> bool:
        """Whether the fold's folder holds a final checkpoint, as ``--val`` needs."""
        if nnunet_paths.nnUNet_results is None:
            return False
        manager = PlansManager(plans)
        return os.path.isfile(os.path.join(get_output_folder(manager.dataset_name, cls.__name__, manager.plans_name,
                                                             configuration, fold), 'checkpoint_final.pth'))

    @classmethod
    def check_decoder_layout(cls) -> None:
        """Stop, naming what the PVT trainers build, where a subclass gives a decoder-layout attribute another
        value than ``PVT_DECODER_LAYOUT``'s (its network would silently be the paper's)."""
        changed = {k: getattr(cls, k) for k, v in PVT_DECODER_LAYOUT.items() if getattr(cls, k) != v}
        if changed:
            raise RuntimeError(f"{cls.__name__} sets {', '.join(f'{k} = {v!r}' for k, v in changed.items())}, but "
                               f"the PVT trainers build only the paper's decoder over PVTv2's four stages ("
                               f"{', '.join(f'{k} = {v!r}' for k, v in PVT_DECODER_LAYOUT.items())}): derive from "
                               f"nnUNetTrainerEMCAD for another decoder layout, over nnU-Net's encoder")

    def _pvt_weights(self) -> Union[None, str, StateDict]:
        """The ImageNet checkpoint named by ``nnUNet_EMCAD_PVT_WEIGHTS`` (checked now, loaded at initialize), or,
        where it says ``timm``, the weights timm's pretrained mechanism fetches (now)."""
        source = os.environ.get(PVT_WEIGHTS_ENV)
        if not source:
            return None
        if source == TIMM_PRETRAINED:
            return timm_pretrained_weights(self.pvt_variant)
        path = os.path.join(source, f'{self.pvt_variant}.pth') if os.path.isdir(source) else source
        if not os.path.isfile(path):
            raise CheckpointError(f"{PVT_WEIGHTS_ENV}={source}, but {path} does not exist: put the ImageNet "
                                  f"{self.pvt_variant} checkpoint there, or unset {PVT_WEIGHTS_ENV} to train "
                                  f"the encoder from scratch")
        return path

    def _fit_patch_size(self) -> None:
        patch = list(self.configuration_manager.patch_size)
        fitted = [max(PVT_MIN_PATCH, math.ceil(p / PVT_V2_STRIDE) * PVT_V2_STRIDE) for p in patch]
        if fitted != patch:
            # the plans dict is what on_train_start saves for the predictor; the (cached) manager is what training reads
            self.plans_manager.plans['configurations'][self.configuration_name]['patch_size'] = fitted
            self.configuration_manager.configuration['patch_size'] = fitted
            self.print_to_log_file(f"{type(self).__name__}: PVTv2 needs patch sizes divisible by {PVT_V2_STRIDE} "
                                   f"and at least {PVT_MIN_PATCH}; patch size {patch} -> {fitted}")

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        require_dimensions(configuration_manager, cls.__name__, cls.dimensions)
        cls.check_decoder_layout()
        return for_nnunet(create_emcad_pvt(cls.pvt_variant, num_output_channels, num_input_channels,
                                           deep_supervision=enable_deep_supervision,
                                           upsample_outputs=cls.upsample_outputs,
                                           norm_op=plan_norm(configuration_arch_kwargs(configuration_manager)),
                                           recompute_stride=cls.recompute_stride,
                                           recompute_encoder=cls.recompute_encoder), cls.__name__)

    def initialize(self) -> None:
        was_initialized = self.was_initialized
        super().initialize()
        if self.pvt_weights and not was_initialized:
            self._load_imagenet_weights()

    def on_train_start(self) -> None:
        """nnU-Net's start of training; a training that starts from epoch 0 where the weights were not resolved
        at construction (``--c`` with no checkpoint to continue from, or a new training of a fold that has a
        final checkpoint) gets them now, or stops with why."""
        super().on_train_start()
        if self.current_epoch == 0 and not self.imagenet_loaded:
            if self.pvt_weights_error is not None:
                raise self.pvt_weights_error
            self.pvt_weights = self._pvt_weights()
            if self.pvt_weights:
                self._load_imagenet_weights()

    def _load_imagenet_weights(self) -> None:
        unwrap(self.network).encoder.load_pretrained(self.pvt_weights)
        self.imagenet_loaded = True
        where = ("through timm's pretrained cache" if isinstance(self.pvt_weights, dict) else
                 f"from {self.pvt_weights}")
        self.print_to_log_file(f"loaded ImageNet {self.pvt_variant} weights {where}")

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.network.parameters(), self.initial_lr, weight_decay=self.weight_decay)
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)


class nnUNetTrainerEMCAD_PVTb0(nnUNetTrainerEMCAD_PVTb2):
    """The paper's EMCAD-B0: PVTv2-b0 encoder, otherwise as ``nnUNetTrainerEMCAD_PVTb2`` (weights file
    ``pvt_v2_b0.pth``), except that nothing runs again in backward: its activations are few, and this is the
    trainer for CPUs, where time is short."""

    pvt_variant = 'pvt_v2_b0'
    recompute_stride = 0


class nnUNetTrainerEMCAD_PVTb2_MUTATION(nnUNetTrainerEMCAD_PVTb2):
    """EMCAD-B2 trained with the paper's MUTATION loss: every head upsampled to the patch size, and
    0.3 CE + 0.7 Dice summed over the logits of all 15 non-empty subsets of the 4 heads."""

    upsample_outputs = 'all'

    def _build_loss(self) -> nn.Module:
        if self.label_manager.has_regions or self.label_manager.ignore_label is not None:
            raise RuntimeError(f"{type(self).__name__} supports plain label maps only (no regions, no ignore "
                               f"label); use nnUNetTrainerEMCAD_PVTb2 for this dataset")
        loss = PaperDiceCELoss(self.label_manager.num_segmentation_heads)
        return FirstTargetLoss(MutationLoss(loss)) if self.enable_deep_supervision else loss


# Five epochs, for smoke tests of a set-up (like nnU-Net's ``nnUNetTrainer_5epochs``).
FIVE_EPOCHS = Schedule(epochs=5)
# 2 epochs of 25 iterations (5 validation iterations): a set-up check in about a minute on a CPU, from one
# epoch into the next, through checkpoints and validation.
SMOKE = Schedule(epochs=2, iterations=25, val_iterations=5)

nnUNetTrainerEMCAD_5epochs = short_schedule(nnUNetTrainerEMCAD, FIVE_EPOCHS, 'nnUNetTrainerEMCAD_5epochs')
nnUNetTrainerEMCAD_PVTb0_5epochs = short_schedule(nnUNetTrainerEMCAD_PVTb0, FIVE_EPOCHS,
                                                  'nnUNetTrainerEMCAD_PVTb0_5epochs')
nnUNetTrainerEMCAD_smoke = short_schedule(nnUNetTrainerEMCAD, SMOKE, 'nnUNetTrainerEMCAD_smoke')
nnUNetTrainerEMCAD3D_smoke = short_schedule(nnUNetTrainerEMCAD3D, SMOKE, 'nnUNetTrainerEMCAD3D_smoke')
nnUNetTrainerEMCAD_PVTb0_smoke = short_schedule(nnUNetTrainerEMCAD_PVTb0, SMOKE, 'nnUNetTrainerEMCAD_PVTb0_smoke')
# 20 epochs of 25 iterations at batch 8 (2 validation iterations): the 500-iteration budget of an ACDC accuracy
# benchmark (docs/results.md), a first model in minutes on a CPU.
FIVE_HUNDRED_ITERATIONS = Schedule(epochs=20, iterations=25, batch_size=8, val_iterations=2)
nnUNetTrainerEMCAD_PVTb0_500it = short_schedule(nnUNetTrainerEMCAD_PVTb0, FIVE_HUNDRED_ITERATIONS,
                                                'nnUNetTrainerEMCAD_PVTb0_500it')
