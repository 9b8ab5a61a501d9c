"""A test-only trainer whose loss stops being finite at once, as with broken images (NaN in the data)."""
from nnunet_emcad.nnunet.trainers import nnUNetTrainerEMCAD_smoke


class nnUNetTrainerEMCAD_diverging(nnUNetTrainerEMCAD_smoke):
    """Every training batch holds NaN, so the first step's loss is NaN."""

    def train_step(self, batch: dict) -> dict:
        batch['data'] = batch['data'] * float('nan')
        return super().train_step(batch)
