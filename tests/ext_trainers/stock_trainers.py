"""A test-only trainer that nnU-Net finds through nnUNet_extTrainer: stock nnU-Net's trainer on the package's
smoke schedule, to compare and ensemble with nnUNetTrainerEMCAD_smoke in a minute instead of nnU-Net's
250-iteration nnUNetTrainer_1epoch."""
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_emcad.nnunet.short_training import short_schedule
from nnunet_emcad.nnunet.trainers.schedules import SMOKE

nnUNetTrainer_smoke = short_schedule(nnUNetTrainer, SMOKE, 'nnUNetTrainer_smoke')
