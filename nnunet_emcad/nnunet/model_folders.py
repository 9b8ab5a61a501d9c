"""Trained nnU-Net models as nnU-Net lays them out (``$nnUNet_results/DatasetXXX/TRAINER__PLANS__CONFIGURATION``,
with ``fold_N/checkpoint_*.pth``): listing them, the network a trainer builds for a plan, and copying a model
under another trainer's name for a trainer whose network was renamed (``nnUNetTrainerEMCAD`` of nnunet-emcad 0.1,
and its ``_5epochs`` and ``_smoke``, built what ``nnUNetTrainerEMCAD_Stride1`` builds now).
"""
import glob
import os
import shutil
from typing import List, Tuple

import torch
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from torch import nn

from nnunet_emcad.model.checkpoints import CheckpointError


def trained_models(results: str) -> List[Tuple[str, List[int]]]:
    """(DATASET/TRAINER__PLANS__CONFIGURATION, folds with a final checkpoint) of every trained model under
    ``results``."""
    found = []
    for dataset in sorted(os.listdir(results)):
        folder = os.path.join(results, dataset)
        models = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
        for model in (m for m in models if os.path.isdir(os.path.join(folder, m))):
            folds = sorted(int(f[len('fold_'):]) for f in os.listdir(os.path.join(folder, model))
                           if f.startswith('fold_') and f[len('fold_'):].isdigit()
                           and os.path.isfile(os.path.join(folder, model, f, 'checkpoint_final.pth')))
            if model.count('__') == 2 and folds:
                found.append((f"{dataset}/{model}", folds))
    return found


def trainer_network(trainer_class: type, plans_manager: PlansManager, configuration: str,
                    dataset_json: dict) -> nn.Module:
    """The network ``trainer_class`` builds for ``configuration`` of these plans and data set, deep supervision on
    (as in training, and as its checkpoints hold it)."""
    configuration_manager = plans_manager.get_configuration(configuration)
    return trainer_class.build_network_architecture(
        plans_manager, configuration_manager,
        determine_num_input_channels(plans_manager, configuration_manager, dataset_json),
        plans_manager.get_label_manager(dataset_json).num_segmentation_heads, True)


def _load(path: str) -> dict:
    """An nnU-Net checkpoint, read as nnU-Net reads its own (pickled objects included: the user's own file)."""
    return torch.load(path, map_location='cpu', weights_only=False)


def rename_trainer(model_folder: str, trainer: str) -> str:
    """Copy ``model_folder`` beside itself as ``trainer``'s model (the folder's name and every checkpoint's
    ``trainer_name``, from which nnU-Net's predictor builds the network), after checking that its weights load
    into ``trainer``'s network; returns the new folder. The original folder is left as it is."""
    model_folder = os.path.abspath(model_folder.rstrip(os.sep))
    parts = os.path.basename(model_folder).split('__')
    if len(parts) != 3 or not os.path.isfile(os.path.join(model_folder, 'plans.json')):
        raise FileNotFoundError(f"{model_folder} is not an nnU-Net model folder (expected "
                                f"$nnUNet_results/DatasetXXX/TRAINER__PLANS__CONFIGURATION holding plans.json)")
    checkpoints = sorted(glob.glob(os.path.join(model_folder, 'fold_*', 'checkpoint_*.pth')))
    if not checkpoints:
        raise FileNotFoundError(f"{model_folder} holds no checkpoint (fold_*/checkpoint_*.pth)")
    trainer_class = recursive_find_trainer_class_by_name(trainer)
    target = os.path.join(os.path.dirname(model_folder), '__'.join([trainer] + parts[1:]))
    if os.path.exists(target):
        raise FileExistsError(f"{target} exists already: move it away first")
    network = trainer_network(trainer_class, PlansManager(os.path.join(model_folder, 'plans.json')), parts[2],
                              load_json(os.path.join(model_folder, 'dataset.json')))
    for path in checkpoints:
        try:
            network.load_state_dict(_load(path)['network_weights'])
        except (CheckpointError, RuntimeError) as e:
            raise CheckpointError(f"{path} does not fit {trainer}'s network: nothing was copied.\n{e}") from e
    shutil.copytree(model_folder, target, symlinks=True)
    for path in checkpoints:
        copied = os.path.join(target, os.path.relpath(path, model_folder))
        checkpoint = _load(copied)
        checkpoint['trainer_name'] = trainer
        torch.save(checkpoint, copied)
    return target
