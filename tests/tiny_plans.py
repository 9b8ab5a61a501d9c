"""nnU-Net plans written by hand, as nnU-Net 2.8's planner writes them, and trainers built from them in process
(no planning, no data): what the trainer and network tests share."""
import copy

import torch

ACDC_2D_ARCH = {  # what nnU-Net 2.8 plans for Dataset027_ACDC 2d (patch 256x224)
    'n_stages': 6, 'features_per_stage': [32, 64, 128, 256, 512, 512],
    'conv_op': 'torch.nn.modules.conv.Conv2d', 'kernel_sizes': [[3, 3]] * 6,
    'strides': [[1, 1], [2, 2], [2, 2], [2, 2], [2, 2], [2, 2]], 'n_conv_per_stage': [2] * 6,
    'n_conv_per_stage_decoder': [2] * 5, 'conv_bias': True,
    'norm_op': 'torch.nn.modules.instancenorm.InstanceNorm2d', 'norm_op_kwargs': {'eps': 1e-05, 'affine': True},
    'dropout_op': None, 'dropout_op_kwargs': None, 'nonlin': 'torch.nn.LeakyReLU', 'nonlin_kwargs': {'inplace': True},
}

DATASET_JSON = {'channel_names': {'0': 'MRI'}, 'labels': {'background': 0, 'a': 1, 'b': 2}, 'numTraining': 10,
                'file_ending': '.nii.gz'}
# 2D configurations as nnU-Net 2.8's ExperimentPlanner writes them: n stages -> a patch that needs them
PATCH_FOR_STAGES = {5: [64, 64], 6: [256, 224], 7: [320, 256], 8: [512, 512]}


def make_plans(n_stages: int, patch, residual: bool = False, extra_3d: bool = False) -> dict:
    """Plans of data set ``Dataset999_Plans`` with one configuration of ``n_stages`` stages at ``patch`` ('2d', or
    '3d_fullres' for a 3D patch), plain or residual; ``extra_3d`` adds a '3d_fullres' one to 2D plans."""
    dim = len(patch)
    strides = [[1] * dim] + [[2] * dim] * (n_stages - 1)
    arch = {'n_stages': n_stages, 'features_per_stage': [min(32 * 2 ** i, 512) for i in range(n_stages)],
            'conv_op': f'torch.nn.modules.conv.Conv{dim}d', 'kernel_sizes': [[3] * dim] * n_stages,
            'strides': strides, 'n_conv_per_stage_decoder': [1 if residual else 2] * (n_stages - 1),
            'conv_bias': True, 'norm_op': f'torch.nn.modules.instancenorm.InstanceNorm{dim}d',
            'norm_op_kwargs': {'eps': 1e-05, 'affine': True}, 'dropout_op': None, 'dropout_op_kwargs': None,
            'nonlin': 'torch.nn.LeakyReLU', 'nonlin_kwargs': {'inplace': True}}
    if residual:
        arch['n_blocks_per_stage'] = [1, 3, 4, 6, 6, 6, 6, 6][:n_stages]
    else:
        arch['n_conv_per_stage'] = [2] * n_stages
    name = 'ResidualEncoderUNet' if residual else 'PlainConvUNet'
    config = {'data_identifier': f'nnUNetPlans_{dim}d', 'preprocessor_name': 'DefaultPreprocessor',
              'batch_size': 2, 'patch_size': list(patch), 'median_image_size_in_voxels': list(patch),
              'spacing': [1.0] * dim, 'normalization_schemes': ['ZScoreNormalization'], 'use_mask_for_norm': [False],
              'resampling_fn_data': 'resample_data_or_seg_to_shape',
              'resampling_fn_seg': 'resample_data_or_seg_to_shape',
              'resampling_fn_data_kwargs': {'is_seg': False, 'order': 3, 'order_z': 0, 'force_separate_z': None},
              'resampling_fn_seg_kwargs': {'is_seg': True, 'order': 1, 'order_z': 0, 'force_separate_z': None},
              'resampling_fn_probabilities': 'resample_data_or_seg_to_shape',
              'resampling_fn_probabilities_kwargs': {'is_seg': False, 'order': 1, 'order_z': 0,
                                                     'force_separate_z': None},
              'architecture': {'network_class_name': f'dynamic_network_architectures.architectures.unet.{name}',
                               'arch_kwargs': arch,
                               '_kw_requires_import': ['conv_op', 'norm_op', 'dropout_op', 'nonlin']},
              'batch_dice': True}
    configurations = {f'{dim}d' if dim == 2 else '3d_fullres': config}
    if extra_3d:
        configurations['3d_fullres'] = make_plans(n_stages, [16] + list(patch))['configurations']['3d_fullres']
    return {'dataset_name': 'Dataset999_Plans', 'plans_name': 'nnUNetPlans',
            'original_median_spacing_after_transp': [1.0, 1.0, 1.0],
            'original_median_shape_after_transp': [16] + list(patch)[-2:], 'image_reader_writer': 'SimpleITKIO',
            'transpose_forward': [0, 1, 2], 'transpose_backward': [0, 1, 2], 'configurations': configurations,
            'experiment_planner_used': 'ExperimentPlanner', 'label_manager': 'LabelManager',
            'foreground_intensity_properties_per_channel': {'0': {'mean': 0.0, 'std': 1.0}},
            'continue_training': False}


def build(cls, plans: dict, configuration: str = '2d'):
    """A ``cls`` trainer for ``plans`` on the CPU, its network built (one input channel), not initialised."""
    trainer = cls(copy.deepcopy(plans), configuration, 0, DATASET_JSON, device=torch.device('cpu'))
    trainer.network = trainer.build_network_architecture(
        trainer.plans_manager, trainer.configuration_manager, 1, trainer.label_manager.num_segmentation_heads, True)
    return trainer
