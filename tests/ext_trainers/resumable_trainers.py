"""A test-only trainer that nnU-Net finds through a user-set nnUNet_extTrainer (next to the package's own):
six short epochs with a checkpoint after each, so that an interrupted run has something to resume."""
from nnunet_emcad.nnunet.short_training import Schedule, short_schedule
from nnunet_emcad.nnunet.trainers import nnUNetTrainerEMCAD

nnUNetTrainerEMCAD_resumable = short_schedule(
    nnUNetTrainerEMCAD, Schedule(epochs=6, iterations=10, val_iterations=2, save_every=1),
    'nnUNetTrainerEMCAD_resumable')
