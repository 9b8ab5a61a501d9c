"""Run at interpreter start by ``zz_nnunet_emcad.pth``: make nnU-Net find this package's trainers.

Appends the dedicated trainer folder to ``nnUNet_extTrainer`` (keeping what the user set there). Imports
nothing heavy: this runs in every Python process of the environment.
"""
import os

TRAINER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'nnunet', 'nnunet_trainers')


def register_trainer_dir() -> None:
    """Append ``TRAINER_DIR`` to ``nnUNet_extTrainer`` unless it is already there."""
    paths = [p for p in os.environ.get('nnUNet_extTrainer', '').split(os.pathsep) if p]
    if TRAINER_DIR not in paths:
        os.environ['nnUNet_extTrainer'] = os.pathsep.join(paths + [TRAINER_DIR])


register_trainer_dir()
