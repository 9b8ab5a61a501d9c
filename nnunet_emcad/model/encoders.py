"""nnU-Net's own encoders (dynamic-network-architectures) whose shallowest stages run again in backward.

Subclasses only: the same parameters under the same names (checkpoints move between them and nnU-Net's
classes), the same outputs and gradients; what changes is what training keeps in memory between forward and
backward. nnU-Net's encoders have no gradient checkpointing of their own (timm's PVTv2 stages do).
"""
from typing import List, Union

import torch
from dynamic_network_architectures.building_blocks.plain_conv_encoder import PlainConvEncoder
from dynamic_network_architectures.building_blocks.residual_encoders import ResidualEncoder

from nnunet_emcad.model.blocks import require_no_running_stats, run_stage


class _RecomputedStages:
    """The shallowest ``recompute_stages`` stages (the first with the stem, where there is one) keep only their
    input for backward and run again there (``blocks.run_stage``)."""

    def __init__(self, *args, recompute_stages: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.recompute_stages = recompute_stages
        if recompute_stages:
            require_no_running_stats(self, "use a plan whose norm_op keeps none (nnU-Net's default plans: instance "
                                           "norm), or recompute no encoder stage")

    def _forward_stage(self, x: torch.Tensor, stage: int) -> torch.Tensor:
        if stage == 0 and getattr(self, 'stem', None) is not None:
            x = self.stem(x)
        return self.stages[stage](x)

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, List[torch.Tensor]]:
        if not (self.recompute_stages and self.training and torch.is_grad_enabled()):
            return super().forward(x)
        skips = []
        for stage in range(len(self.stages)):
            x = run_stage(self._forward_stage, x, stage, recompute=stage < self.recompute_stages)
            skips.append(x)
        return skips if self.return_skips else skips[-1]


class RecomputedPlainConvEncoder(_RecomputedStages, PlainConvEncoder):
    """nnU-Net's ``PlainConvEncoder`` whose first ``recompute_stages`` stages run again in backward."""


class RecomputedResidualEncoder(_RecomputedStages, ResidualEncoder):
    """nnU-Net's ``ResidualEncoder`` whose stem and first ``recompute_stages`` stages run again in backward."""


RECOMPUTED = {PlainConvEncoder: RecomputedPlainConvEncoder, ResidualEncoder: RecomputedResidualEncoder}
"""nnU-Net's encoder classes -> their subclasses here."""
