"""The trainers nnU-Net finds by name (``-tr``), one module per what varies, as nnU-Net keeps its variants:

- ``base``: ``nnUNetTrainerEMCAD``, the base of every EMCAD trainer and the default, and the checks they share;
- ``nnunet_encoder``: EMCAD at the encoder's widths over nnU-Net's plain or residual encoder, in 2D and 3D;
- ``pvt``: the paper's EMCAD-B0 and -B2 over PVTv2, and B2 with the MUTATION loss;
- ``schedules``: short schedules (set-up checks, five epochs, a first model on a CPU);
- ``ablations``: trainers measured against the default (docs/results.md), not picked.

Models keep loading under any of these names: nnU-Net stores a trainer's name, not its module.
"""
from nnunet_emcad.nnunet.trainers import ablations, base, nnunet_encoder, pvt, schedules
from nnunet_emcad.nnunet.trainers.ablations import *  # noqa: F401,F403
from nnunet_emcad.nnunet.trainers.base import *  # noqa: F401,F403
from nnunet_emcad.nnunet.trainers.nnunet_encoder import *  # noqa: F401,F403
from nnunet_emcad.nnunet.trainers.pvt import *  # noqa: F401,F403
from nnunet_emcad.nnunet.trainers.schedules import *  # noqa: F401,F403

__all__ = base.__all__ + nnunet_encoder.__all__ + pvt.__all__ + schedules.__all__ + ablations.__all__
