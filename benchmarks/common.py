"""Shared by the benchmarks: the machine, nnU-Net folders, plans of the shared data sets, result files."""
import json
import os
import platform
from typing import Dict

from nnunet_emcad import scripts
from nnunet_emcad.source_tree import shared_data_dir

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED_DATA = shared_data_dir()
RESULTS = os.path.join(HERE, 'results')
CACHE = os.path.join(HERE, '.cache')

STOCK = 'nnUNetTrainer'
EMCAD_TRAINERS = ['nnUNetTrainerEMCAD', 'nnUNetTrainerEMCAD_ResEnc', 'nnUNetTrainerEMCAD_PVTb0',
                  'nnUNetTrainerEMCAD_PVTb2']
EMCAD_3D_TRAINERS = ['nnUNetTrainerEMCAD3D', 'nnUNetTrainerEMCAD3D_ResEnc']


def machine() -> Dict[str, str]:
    """What the numbers were measured on."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            cpu = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        pass
    info = {'cpu': cpu, 'cores': str(os.cpu_count()), 'python': platform.python_version(),
            'torch': torch.__version__, 'gpu': torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}
    return info


def acdc_plans(cache: str = CACHE) -> Dict[str, str]:
    """nnU-Net's default and ResEnc M plans for ``../shared/data/Dataset027_ACDC`` (planned once, cached)."""
    dataset = os.path.join(SHARED_DATA, 'Dataset027_ACDC')
    if not os.path.isdir(dataset):
        raise SystemExit(f"{dataset} is absent: pass --plans (a nnUNetPlans.json) instead")
    root = os.path.join(cache, 'acdc')
    env = scripts.nnunet_env(root, raw=SHARED_DATA)
    folder = os.path.join(env['nnUNet_preprocessed'], 'Dataset027_ACDC')
    plans = {'default': os.path.join(folder, 'nnUNetPlans.json'),
             'resenc_m': os.path.join(folder, 'nnUNetResEncUNetMPlans.json')}
    log = os.path.join(root, 'planning.log')
    if not os.path.isfile(os.path.join(folder, 'dataset_fingerprint.json')):
        print(f"planning ACDC with nnU-Net (once; log: {log})", flush=True)
        scripts.run_logged(['nnUNetv2_extract_fingerprint', '-d', '27', '-np', env['nnUNet_def_n_proc']], env, log)
    if not os.path.isfile(plans['default']):
        scripts.run_logged(['nnUNetv2_plan_experiment', '-d', '27'], env, log)
    if not os.path.isfile(plans['resenc_m']):
        scripts.run_logged(['nnUNetv2_plan_experiment', '-d', '27', '-pl', 'nnUNetPlannerResEncM'], env, log)
    return plans


def write_results(name: str, payload: dict, markdown: str, out_dir: str = RESULTS) -> None:
    """``<out_dir>/<name>.json`` and ``.md``."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f'{name}.json'), 'w') as f:
        json.dump(payload, f, indent=2)
    with open(os.path.join(out_dir, f'{name}.md'), 'w') as f:
        f.write(markdown)
    print(f"wrote {os.path.join(out_dir, name)}.json and .md")
