"""Short schedules of the trainers a user picks: set-up checks (two epochs), five epochs (like nnU-Net's
``nnUNetTrainer_5epochs``) and a first model in minutes on a CPU."""
from nnunet_emcad.nnunet.short_training import Schedule, short_schedule
from nnunet_emcad.nnunet.trainers.base import nnUNetTrainerEMCAD
from nnunet_emcad.nnunet.trainers.nnunet_encoder import nnUNetTrainerEMCAD3D
from nnunet_emcad.nnunet.trainers.pvt import nnUNetTrainerEMCAD_PVTb0

__all__ = [
    'nnUNetTrainerEMCAD_5epochs', 'nnUNetTrainerEMCAD_PVTb0_5epochs', 'nnUNetTrainerEMCAD_smoke',
    'nnUNetTrainerEMCAD3D_smoke', 'nnUNetTrainerEMCAD_PVTb0_smoke', 'nnUNetTrainerEMCAD_PVTb0_500it',
]

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
