"""ONNX export of a trained nnU-Net fold (any trainer nnU-Net can load, EMCAD's or stock), checked with
onnxruntime, with the plan facts a deployer needs written next to it.

The graph is the network alone: input ``image`` (batch, channels, *patch), output ``logits`` (batch, classes,
*patch), deep supervision off, dynamic batch, fixed patch size. nnU-Net's preprocessing (transpose,
resampling to the plan's spacing, normalisation), sliding window with Gaussian weighting, mirroring and the
export of the segmentation stay outside it; the JSON file lists what they need.
"""
import json
import os
from typing import Dict, Optional

import numpy as np
import torch

from nnunet_emcad.nnunet.trainers.base import check_checkpoint_file


def load_predictor(model_folder: str, fold: str, checkpoint_name: str = 'checkpoint_final.pth'):
    """nnU-Net's predictor initialised from a trained fold on the CPU (network built by the trainer, DS off)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    checkpoint = os.path.join(model_folder, f'fold_{fold}', checkpoint_name)
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"{checkpoint} does not exist: train that fold first (nnUNetv2_train), or pick "
                                f"another -f / -chk")
    check_checkpoint_file(checkpoint)
    predictor = nnUNetPredictor(device=torch.device('cpu'), perform_everything_on_device=False, verbose=False,
                                allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(model_folder, (int(fold) if fold != 'all' else fold,),
                                                   checkpoint_name)
    predictor.network.eval()
    return predictor


def plan_facts(predictor, configuration: str, fold: str, checkpoint_name: str) -> Dict:
    """What a deployer needs to reproduce nnU-Net's pre- and postprocessing around the exported network."""
    plans, config = predictor.plans_manager, predictor.configuration_manager
    return {
        'trainer': predictor.trainer_name, 'plans': plans.plans_name, 'configuration': configuration,
        'fold': fold, 'checkpoint': checkpoint_name,
        'input': 'image', 'output': 'logits (softmax over axis 1 for probabilities, argmax for labels)',
        'patch_size': list(config.patch_size), 'spacing': list(config.spacing),
        'transpose_forward': list(plans.transpose_forward), 'transpose_backward': list(plans.transpose_backward),
        'channel_names': predictor.dataset_json['channel_names'], 'labels': predictor.dataset_json['labels'],
        'normalization_schemes': list(config.normalization_schemes),
        'use_mask_for_norm': list(config.use_mask_for_norm),
        'foreground_intensity_properties_per_channel': plans.foreground_intensity_properties_per_channel,
        'file_ending': predictor.dataset_json['file_ending'],
        'not_in_the_graph': 'transpose, resampling to spacing, normalisation, sliding window (Gaussian, step 0.5), '
                            'mirroring, resampling back, argmax',
    }


def export_onnx(model_folder: str, fold: str, output: str, checkpoint_name: str = 'checkpoint_final.pth',
                check_batches: int = 3, seed: int = 0) -> Dict:
    """Export a trained fold to ``output`` (ONNX, dynamic batch), compare onnxruntime with PyTorch on random
    inputs, and write the plan facts to ``output`` with ``.json`` for ``.onnx``; returns those facts (with
    ``max_abs_difference``) and the facts file's path (``json``)."""
    import onnxruntime
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

    predictor = load_predictor(model_folder, fold, checkpoint_name)
    network = predictor.network
    channels = determine_num_input_channels(predictor.plans_manager, predictor.configuration_manager,
                                            predictor.dataset_json)
    patch = list(predictor.configuration_manager.patch_size)
    example = torch.randn(2, channels, *patch)
    torch.onnx.export(network, (example,), output, input_names=['image'], output_names=['logits'],
                      dynamic_shapes=({0: torch.export.Dim('batch', min=1, max=1024)},), dynamo=True,
                      external_data=False, verbose=False)
    session = onnxruntime.InferenceSession(output, providers=['CPUExecutionProvider'])
    generator = torch.Generator().manual_seed(seed)
    difference = 0.0
    for batch in range(1, check_batches + 1):
        x = torch.randn(batch, channels, *patch, generator=generator)
        with torch.no_grad():
            expected = network(x).numpy()
        got = session.run(['logits'], {'image': x.numpy()})[0]
        if got.shape != expected.shape:
            raise RuntimeError(f"onnxruntime gave shape {got.shape}, PyTorch {expected.shape}")
        difference = max(difference, float(np.abs(got - expected).max()))
    facts = plan_facts(predictor, os.path.basename(model_folder.rstrip(os.sep)).split('__')[-1], fold,
                       checkpoint_name)
    facts.update(onnx=os.path.basename(output), max_abs_difference=difference, checked_batches=check_batches,
                 torch=torch.__version__, onnxruntime=onnxruntime.__version__)
    facts_file = os.path.splitext(output)[0] + '.json'
    with open(facts_file, 'w') as f:
        json.dump(facts, f, indent=2)
    return dict(facts, json=facts_file)


def model_folder_for(dataset: str, trainer: str, plans: str, configuration: str,
                     results: Optional[str] = None) -> str:
    """nnU-Net's results folder of a trained model: ``nnUNet_results/DatasetX/trainer__plans__configuration``."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    results = results or os.environ.get('nnUNet_results')
    if not results:
        raise RuntimeError("nnUNet_results is not set: export it to the folder nnUNetv2_train wrote")
    return os.path.join(results, maybe_convert_to_dataset_name(dataset), f'{trainer}__{plans}__{configuration}')
