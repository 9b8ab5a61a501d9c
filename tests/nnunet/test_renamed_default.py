"""Models of nnunet-emcad 0.1's default trainer (whose network is nnUNetTrainerEMCAD_Stride1's now): loading one
into today's default names that trainer and the command that moves it there; after that command it predicts there
with the same weights."""
import json
import os
import subprocess
import sys

import pytest
import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

from nnunet_emcad.model.checkpoints import CheckpointError
from nnunet_emcad.nnunet import trainers as T
import warm_commands
from tiny_plans import DATASET_JSON, build, make_plans

pytestmark = pytest.mark.usefixtures('nnunet_folders')
BIN = os.path.dirname(sys.executable)


def old_default_model(results: str) -> str:
    """A model folder as nnunet-emcad 0.1 wrote it for nnUNetTrainerEMCAD: the full-resolution decoder's weights
    under that trainer's name, with what nnU-Net's predictor reads from a checkpoint."""
    plans = make_plans(5, [64, 64])
    network = build(T.nnUNetTrainerEMCAD_Stride1, plans).network
    model = os.path.join(results, 'Dataset999_Tiny', 'nnUNetTrainerEMCAD__nnUNetPlans__2d')
    path = os.path.join(model, 'fold_0', 'checkpoint_final.pth')
    os.makedirs(os.path.dirname(path))
    torch.save({'trainer_name': 'nnUNetTrainerEMCAD', 'init_args': {'configuration': '2d'},
                'inference_allowed_mirroring_axes': (0, 1), 'network_weights': network.state_dict()}, path)
    for name, content in (('plans.json', plans), ('dataset.json', DATASET_JSON)):
        with open(os.path.join(model, name), 'w') as f:
            json.dump(content, f)
    return model


def predictor(model: str) -> nnUNetPredictor:
    p = nnUNetPredictor(device=torch.device('cpu'), perform_everything_on_device=False)
    p.initialize_from_trained_model_folder(model, (0,), 'checkpoint_final.pth')
    return p


def rename(model: str, trainer: str) -> subprocess.CompletedProcess:
    return warm_commands.run([os.path.join(BIN, 'nnunet-emcad'), 'rename-trainer', model, trainer], dict(os.environ),
                             stderr=subprocess.PIPE)


def test_an_old_default_model_names_its_trainer_now_and_predicts_there_after_rename_trainer():
    model = old_default_model(os.environ['nnUNet_results'])
    with pytest.raises(CheckpointError, match=r'\(nnunet-emcad rename-trainer MODEL_FOLDER nnUNetTrainerEMCAD_Stride1\)'
                                              ' and predict with -tr nnUNetTrainerEMCAD_Stride1'):
        predictor(model)
    proc = rename(model, 'nnUNetTrainerEMCAD_Stride1')
    assert proc.returncode == 0, proc.stderr[-2000:]
    moved = os.path.join(os.path.dirname(model), 'nnUNetTrainerEMCAD_Stride1__nnUNetPlans__2d')
    assert proc.stdout == f"copied to {moved}: predict with -tr nnUNetTrainerEMCAD_Stride1 (the original folder " \
                          f"is unchanged)\n"
    loaded = predictor(moved)
    assert loaded.trainer_name == 'nnUNetTrainerEMCAD_Stride1'
    saved = torch.load(os.path.join(model, 'fold_0', 'checkpoint_final.pth'), weights_only=False)
    assert saved['trainer_name'] == 'nnUNetTrainerEMCAD'  # the original stays as it was
    weights = loaded.list_of_parameters[0]
    assert weights.keys() == saved['network_weights'].keys()
    assert all(torch.equal(v, saved['network_weights'][k]) for k, v in weights.items())
    again = rename(model, 'nnUNetTrainerEMCAD_Stride1')
    assert again.returncode == 1 and 'exists already: move it away first' in again.stderr


def test_rename_trainer_refuses_a_trainer_whose_network_the_weights_do_not_fit():
    model = old_default_model(os.environ['nnUNet_results'])
    proc = rename(model, 'nnUNetTrainerEMCAD_Stride4')
    assert proc.returncode == 1
    assert "does not fit nnUNetTrainerEMCAD_Stride4's network: nothing was copied" in proc.stderr
    assert not os.path.exists(os.path.join(os.path.dirname(model), 'nnUNetTrainerEMCAD_Stride4__nnUNetPlans__2d'))


def test_only_the_renamed_trainer_points_a_mismatched_model_elsewhere():
    plans = make_plans(5, [64, 64])
    model = old_default_model(os.environ['nnUNet_results'])
    weights = torch.load(os.path.join(model, 'fold_0', 'checkpoint_final.pth'), weights_only=False)['network_weights']
    for cls in (T.nnUNetTrainerEMCAD_Stride2Narrow, T.nnUNetTrainerEMCAD_PVTb0_smoke, T.nnUNetTrainerEMCAD_Stride4):
        with pytest.raises(CheckpointError) as e:
            build(cls, plans).network.load_state_dict(weights)
        assert 'Use the trainer (-tr), plans (-p) and configuration (-c)' in str(e.value)
        assert 'rename-trainer' not in str(e.value)


# The trainer names whose network in nnunet-emcad 0.1 is nnUNetTrainerEMCAD_Stride1's now: found by building every
# trainer's network on the same plans at 0.1 (the commit before db50dfb) and at 0.2 and comparing the weights' shapes.
BUILT_STRIDE1_IN_0_1 = ('nnUNetTrainerEMCAD', 'nnUNetTrainerEMCAD_5epochs', 'nnUNetTrainerEMCAD_smoke')


@pytest.mark.parametrize('name', BUILT_STRIDE1_IN_0_1)
def test_every_trainer_whose_network_changed_since_0_1_names_where_its_old_models_belong(name):
    plans = make_plans(5, [64, 64])
    old = build(T.nnUNetTrainerEMCAD_Stride1, plans).network.state_dict()
    with pytest.raises(CheckpointError, match=rf"A model trained as {name} with nnunet-emcad 0.1 holds "
                                              r"nnUNetTrainerEMCAD_Stride1's network: copy it there \(nnunet-emcad "
                                              r"rename-trainer MODEL_FOLDER nnUNetTrainerEMCAD_Stride1\)"):
        build(getattr(T, name), plans).network.load_state_dict(old)
