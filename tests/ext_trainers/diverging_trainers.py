"""A test-only trainer whose loss stops being finite at once, as with broken images (NaN in the data)."""
import torch

from nnunet_emcad.trainers import nnUNetTrainerEMCAD


class nnUNetTrainerEMCAD_diverging(nnUNetTrainerEMCAD):
    """Every training batch holds NaN, so the first step's loss is NaN."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 1
        self.num_iterations_per_epoch = 2
        self.num_val_iterations_per_epoch = 1

    def train_step(self, batch: dict) -> dict:
        batch['data'] = batch['data'] * float('nan')
        return super().train_step(batch)
