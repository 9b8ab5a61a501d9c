"""A test-only trainer that nnU-Net finds through nnUNet_extTrainer: the README's CPU-route trainer
(nnUNetTrainerEMCAD_PVTb0_500it) on a fifth of its iterations, so that the route's commands run in a test in about
a minute; the 500-iteration schedule itself is checked in process."""
from dataclasses import replace

from nnunet_emcad.nnunet.short_training import short_schedule
from nnunet_emcad.nnunet.trainers.pvt import nnUNetTrainerEMCAD_PVTb0
from nnunet_emcad.nnunet.trainers.schedules import FIVE_HUNDRED_ITERATIONS

ROUTE_EPOCHS = 4
nnUNetTrainerEMCAD_PVTb0_route = short_schedule(
    nnUNetTrainerEMCAD_PVTb0, replace(FIVE_HUNDRED_ITERATIONS, epochs=ROUTE_EPOCHS), 'nnUNetTrainerEMCAD_PVTb0_route')
