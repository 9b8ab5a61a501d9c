"""The folder nnU-Net searches through ``nnUNet_extTrainer``: it re-exports the trainers.

nnU-Net imports this module under a top-level name and drops it again; the classes keep their home modules in
``nnunet_emcad.nnunet.trainers``, so pickles refer to those (nnU-Net's checkpoints store a trainer's name only).
"""
from nnunet_emcad.nnunet.trainers import *  # noqa: F401,F403
from nnunet_emcad.nnunet.trainers import __all__  # noqa: F401
