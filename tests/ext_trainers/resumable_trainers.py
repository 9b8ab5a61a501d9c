"""A test-only trainer that nnU-Net finds through a user-set nnUNet_extTrainer (next to the package's own)."""
import torch

from nnunet_emcad.trainers import nnUNetTrainerEMCAD


class nnUNetTrainerEMCAD_resumable(nnUNetTrainerEMCAD):
    """Eight short epochs with a checkpoint after each, so that an interrupted run has something to resume."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 8
        self.num_iterations_per_epoch = 10
        self.num_val_iterations_per_epoch = 2
        self.save_every = 1
