"""The base of every EMCAD trainer, ``nnUNetTrainerEMCAD`` (also the default), and the checks the trainers
share. Each trainer overrides only what it changes; nnU-Net keeps planning, preprocessing, augmentation,
cross-validation, validation, evaluation, ensembling and postprocessing.

``build_network_architecture`` is a classmethod here (so a variant changes a class attribute, not the method);
nnU-Net calls it with the same arguments as the stock static method, in training and in the predictor. It
never reads files: ImageNet weights are loaded when a new training starts, never for ``--c`` or ``--val``.
"""
import math
import os
import zipfile
from typing import List, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch._dynamo import OptimizedModule
from torch.nn.parallel import DistributedDataParallel as DDP

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from nnunet_emcad.model.emcad import EMCADNet
from nnunet_emcad.nnunet.plans import configuration_arch_kwargs, configuration_encoder_kind, create_emcad_unet

__all__ = [
    'nnUNetTrainerEMCAD',
]

PVT_WEIGHTS_ENV = 'nnUNet_EMCAD_PVT_WEIGHTS'
WEIGHTS_FIX = 'Use the trainer (-tr), plans (-p) and configuration (-c) the checkpoint was trained with.'
# Trainer names of nnunet-emcad 0.1 whose network is another trainer's now: the default's layout changed in 0.2, and
# with it its short schedules'.
RENAMED_TRAINERS = dict.fromkeys(('nnUNetTrainerEMCAD', 'nnUNetTrainerEMCAD_5epochs', 'nnUNetTrainerEMCAD_smoke'),
                                 'nnUNetTrainerEMCAD_Stride1')


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
    lgag_gate_norm = True  # LGAG's one-channel gate map normalised before its sigmoid (the official code's)
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
                                            mscb_only_stride=cls.mscb_only_stride,
                                            gate_norm=cls.lgag_gate_norm), cls.__name__)

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
