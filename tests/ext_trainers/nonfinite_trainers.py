"""A test-only trainer whose gradients are never finite, as under the compiled-backward bug the skipped-step guard
is for."""
import torch

from nnunet_emcad.nnunet.trainers import nnUNetTrainerEMCAD_smoke
from nnunet_emcad.nnunet.trainers.base import unwrap


class nnUNetTrainerEMCAD_nonfinite(nnUNetTrainerEMCAD_smoke):
    """A GradScaler on the CPU (nnU-Net makes one on CUDA only) and a gradient hook that makes every gradient of
    the first head infinite, so the GradScaler skips every step (15 iterations per epoch: 20 skips end in epoch 1)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_iterations_per_epoch = 15
        self.grad_scaler = torch.amp.GradScaler('cpu')

    def initialize(self) -> None:
        super().initialize()
        for parameter in unwrap(self.network).decoder.seg_layers[0].parameters():
            parameter.register_hook(lambda grad: grad * float('inf'))
