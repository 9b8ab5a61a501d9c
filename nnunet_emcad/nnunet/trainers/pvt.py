"""The paper's EMCAD-B0 and -B2: the EMCAD decoder over a PVTv2 encoder (timm), with ImageNet weights where
given, and EMCAD-B2 under the paper's MUTATION loss."""

import math
import os
from typing import Union

import torch
from torch import nn

from nnunetv2 import paths as nnunet_paths
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.utilities.file_path_utilities import get_output_folder
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from nnunet_emcad.model.checkpoints import TIMM_PRETRAINED, CheckpointError, StateDict, timm_pretrained_weights
from nnunet_emcad.model.emcad import PVT_V2_STRIDE, create_emcad_pvt
from nnunet_emcad.nnunet.losses import FirstTargetLoss, MutationLoss, PaperDiceCELoss
from nnunet_emcad.nnunet.plans import configuration_arch_kwargs, plan_norm
from nnunet_emcad.nnunet.trainers.base import (PVT_WEIGHTS_ENV, for_nnunet, nnUNetTrainerEMCAD, require_dimensions,
                                               unwrap)

__all__ = [
    'nnUNetTrainerEMCAD_PVTb2', 'nnUNetTrainerEMCAD_PVTb0', 'nnUNetTrainerEMCAD_PVTb2_MUTATION',
]

# The PVT trainers' smallest patch per axis: the deepest stage (1/32) then has more than one position to normalise.
PVT_MIN_PATCH = 2 * PVT_V2_STRIDE
# nnUNetTrainerEMCAD's decoder-layout attributes, each with the one value the PVT trainers build: the paper's decoder
# over PVTv2's four stages (strides 4 to 32, at PVTv2's widths).
PVT_DECODER_LAYOUT = {'encoder_kind': None, 'decoder_stride': 4, 'light_stages': False, 'decoder_width': None,
                      'refine_channels': 0, 'mscb_kernel_sizes': (1, 3, 5), 'mscb_expansion_factor': 2,
                      'mscb_only_stride': 0, 'lgag_gate_norm': True}


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
