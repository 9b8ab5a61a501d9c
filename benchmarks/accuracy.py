"""Accuracy through the real nnU-Net pipeline: stock nnU-Net against the EMCAD trainers, under two budgets.

For each trainer: nnUNetv2_plan_and_preprocess (once), nnUNetv2_train on one fold with a budget, then
nnUNetv2_predict over the fold's validation cases (timed end to end; it stands in for the trainer's own final
validation, which the budgeted trainers skip) and nnUNetv2_evaluate_folder on its output (Dice per class), plus
HD95 in mm on the same files. Budgets:
  equal iterations  every trainer trains --iterations iterations;
  equal time        every trainer trains for as long as stock nnU-Net's equal-iteration runs took on this
                    machine, on average (its own mean seconds per iteration decide how many iterations that is,
                    to the nearest whole epoch, at least one).
Budgets run through generated trainer subclasses (Bench_<trainer>_it<N>, Bench_<trainer>_it<N>_run<k> for the
k-th run) and a plans copy with the batch size of --batch-size (nnUNetBenchPlans, reusing the preprocessed data).
--runs N trains every trainer N times under each budget, on the same fold: nnU-Net seeds only its split, so each
run draws another initialisation, other batches and other augmentations, and every run is scored on the same
held-out cases. The report gives each trainer's runs, their mean and spread (max - min), and calls a difference to
stock that is not larger than the larger of the two spreads a tie. The equal-time budget is stock's mean training
time over its runs. The report's floor is the Dice of predicting a class everywhere on the same cases (what an
untrained network may score): a budget whose stock run is not well above it cannot separate the trainers.
--patch-size trains on a smaller patch, with the topology nnU-Net's planner gives it, for cheaper runs. The full
nnU-Net schedule is what a GPU user runs instead: nnUNetv2_train DATASET 2d FOLD -tr nnUNetTrainerEMCAD.
--configuration 3d_fullres compares stock nnU-Net 3D with the EMCAD 3D trainers (results
accuracy_<dataset>_3d_fullres). --dataset DatasetNNN_Name --raw FOLDER runs it on a data set of your own.
--eval-at 300 600 1200 2400 scores every equal-iteration run also at those iterations: the run keeps its network
at each (checkpoint_it<N>.pth, beside nnU-Net's checkpoints), each is predicted (with nnU-Net's predictor, in this
process: its prediction is not timed) and scored like the final one, and
the report gives Dice against iterations and, with --step-times (an against_stock report at the same batch and
patch), against training minutes from seconds per step measured in turn with stock.
Each run writes its measurements (benchmark.json in its nnU-Net output folder under --work) when it ends, and a
later command with the same settings reuses them (one that changes only --disable-tta predicts again with the
trained checkpoint); a run stopped part-way (killed, or at --max-minutes) continues from its last checkpoint
through nnUNetv2_train --c, and the points it reached are scored once. The report
(benchmarks/results/accuracy_<dataset>.json, or --name, .md, a Dice-vs-GFLOPs plot and training curves) is
rewritten after every finished run, so a stopped benchmark keeps what it measured and the same command finishes it.
"""
import argparse
import contextlib
import io
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence, Tuple
from unittest import mock

import numpy as np

if __package__ in (None, ''):  # run as python benchmarks/<name>.py: import benchmarks.* from the checkout's root
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from benchmarks.harness import (BENCH_PLANS, CACHE, EMCAD_3D_TRAINERS, EMCAD_TRAINERS, RESULTS, STOCK, bench_plans,
                                machine, malloc_note, point_records, point_summaries, reproduce_command, runs_summary,
                                verdict, versus_stock, write_results)
from nnunet_emcad.command.paths import shared_data_dir
from nnunet_emcad.command.scripts import CommandFailed, nnunet_env, plan_command, run_logged
from nnunet_emcad.model.counting import count_flops
from nnunet_emcad.nnunet.short_training import Schedule, snapshot_file, write_trainer_module

SHARED_DATA = shared_data_dir()

DATASETS = {'acdc': (27, 'Dataset027_ACDC'), 'isbi': (28, 'Dataset028_ISBI2012')}
TRAINER_MODULES = {STOCK: 'nnunetv2.training.nnUNetTrainer.nnUNetTrainer'}


def dataset_id_and_name(dataset: str) -> Tuple[int, str]:
    """nnU-Net's id and folder name of --dataset: acdc, isbi or a DatasetNNN_Name of one's own."""
    if dataset in DATASETS:
        return DATASETS[dataset]
    match = re.fullmatch(r'Dataset(\d{3})_\w+', dataset)
    if match is None:
        raise ValueError(f"--dataset {dataset}: give acdc, isbi or an nnU-Net data set's folder name "
                         f"(DatasetNNN_Name) with --raw")
    return int(match.group(1)), dataset


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


def prepare_isbi(raw: str) -> None:
    """ISBI 2012 EM (../shared/data/ISBI2012_EM) in nnU-Net raw format: label 1 = membrane."""
    from PIL import Image

    source = os.path.join(SHARED_DATA, 'ISBI2012_EM', 'train')
    folder = os.path.join(raw, DATASETS['isbi'][1])
    if os.path.isfile(os.path.join(folder, 'dataset.json')):
        return
    for sub in ('imagesTr', 'labelsTr'):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    names = sorted(os.listdir(os.path.join(source, 'image')), key=lambda n: int(n.split('.')[0]))
    for name in names:
        case = f"isbi_{int(name.split('.')[0]):03d}"
        shutil.copy(os.path.join(source, 'image', name), os.path.join(folder, 'imagesTr', f'{case}_0000.png'))
        label = np.array(Image.open(os.path.join(source, 'label', name)).convert('L'))
        Image.fromarray((label < 128).astype(np.uint8)).save(os.path.join(folder, 'labelsTr', f'{case}.png'))
    with open(os.path.join(folder, 'dataset.json'), 'w') as f:
        json.dump({'channel_names': {'0': 'EM'}, 'labels': {'background': 0, 'membrane': 1},
                   'numTraining': len(names), 'file_ending': '.png'}, f)


def prepare(dataset: str, root: str, batch_size: int, log: str, configuration: str = '2d',
            trainer_dir: Optional[str] = None, raw: Optional[str] = None,
            patch_size: Optional[List[int]] = None) -> Dict[str, str]:
    """Raw data, plans, preprocessed data and the benchmark plans copy; returns the environment.

    ``raw`` is the nnU-Net raw folder of a data set of one's own (``dataset`` its DatasetNNN_Name)."""
    dataset_id, name = dataset_id_and_name(dataset)
    if dataset == 'isbi':
        if not os.path.isdir(os.path.join(SHARED_DATA, 'ISBI2012_EM')):
            raise SystemExit(f"{os.path.join(SHARED_DATA, 'ISBI2012_EM')} is absent")
        env = nnunet_env(root, trainer_dir=trainer_dir, configuration=configuration)
        prepare_isbi(env['nnUNet_raw'])
    else:
        raw = SHARED_DATA if dataset == 'acdc' else raw
        if not os.path.isdir(os.path.join(raw, name)):
            raise SystemExit(f"{os.path.join(raw, name)} is absent")
        env = nnunet_env(root, raw=raw, trainer_dir=trainer_dir, configuration=configuration)
    preprocessed = os.path.join(env['nnUNet_preprocessed'], name)
    if not os.path.isdir(os.path.join(preprocessed, f'nnUNetPlans_{configuration}')):
        print(f"planning and preprocessing {name} (once; log: {log})", flush=True)
        run_logged(plan_command(dataset_id, configuration, env), env, log)
    splits = os.path.join(env['nnUNet_raw'], name, 'splits_final.json')
    if os.path.isfile(splits):
        shutil.copy(splits, os.path.join(preprocessed, 'splits_final.json'))
    plans = bench_plans(_read_json(os.path.join(preprocessed, 'nnUNetPlans.json')), configuration, batch_size,
                        patch_size)
    with open(os.path.join(preprocessed, f'{BENCH_PLANS}.json'), 'w') as f:
        json.dump(plans, f, indent=1)
    return env


def bench_name(trainer: str, iterations: int, run: int = 1) -> str:
    """The generated trainer of ``trainer``'s ``run``-th run (from 1) with a budget of ``iterations``."""
    return f'Bench_{trainer}_it{iterations}' + (f'_run{run}' if run > 1 else '')


def schedule(iterations: int, per_epoch: int, val_iterations: int, eval_at: Sequence[int] = ()) -> Schedule:
    """The short schedule of a budget of ``iterations``: no final validation, and for the points of ``eval_at``
    before the last, a snapshot of the network, with nnU-Net's checkpoint saved at their greatest common divisor
    (where a stopped run continues)."""
    snapshots = tuple(n // per_epoch for n in eval_at if n < iterations)
    return Schedule(max(1, iterations // per_epoch), per_epoch, None, val_iterations, final_validation=False,
                    save_every=math.gcd(*snapshots) if snapshots else None, snapshots=snapshots)


def write_trainers(folder: str, budgets: List[tuple], per_epoch: int, val_iterations: int, runs: int,
                   eval_at: Sequence[int] = ()) -> None:
    """A module of budgeted trainer subclasses, one per budget and run, for nnU-Net to find through
    nnUNet_extTrainer; the budget whose iterations are the last of ``eval_at`` keeps snapshots at the others."""
    write_trainer_module(os.path.join(folder, 'bench_trainers.py'), 'Generated by benchmarks/accuracy.py: budgeted '
                         'trainers.', [(bench_name(trainer, iterations, run), trainer,
                                        TRAINER_MODULES.get(trainer, 'nnunet_emcad.nnunet.trainers'),
                                        schedule(iterations, per_epoch, val_iterations,
                                                 eval_at if eval_at and iterations == eval_at[-1] else ()))
                                       for trainer, iterations in budgets for run in range(1, runs + 1)])


def _surface(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return mask & ~ndimage.binary_erosion(mask)


def hd95(reference: np.ndarray, prediction: np.ndarray, spacing: List[float]) -> float:
    """95th-percentile Hausdorff distance between two non-empty masks, in the units of ``spacing``.

    The larger of the two directed 95th percentiles of surface-to-surface distances (MONAI's convention);
    axes of size 1 are dropped, so a 2D image is measured in 2D.
    """
    from scipy import ndimage

    keep = [i for i, n in enumerate(reference.shape) if n > 1]
    shape = [reference.shape[i] for i in keep]
    spacing = [spacing[i] for i in keep]
    ref, pred = _surface(reference.reshape(shape)), _surface(prediction.reshape(shape))
    to_ref = ndimage.distance_transform_edt(~ref, sampling=spacing)[pred]
    to_pred = ndimage.distance_transform_edt(~pred, sampling=spacing)[ref]
    return float(max(np.percentile(to_ref, 95), np.percentile(to_pred, 95)))


def _reader_and_labels(dataset_json: dict, example: str) -> Tuple[object, List[int]]:
    """nnU-Net's reader for segmentations like the file ``example``, and the data set's foreground labels."""
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    reader = determine_reader_writer_from_dataset_json(dataset_json, example)()
    return reader, [v for k, v in dataset_json['labels'].items() if k != 'background' and isinstance(v, int)]


def constant_dice(reference_folder: str, cases: List[str], dataset_json: dict) -> Dict[str, float]:
    """Per label, the mean over ``cases`` of the Dice that predicting the label everywhere scores against the
    reference: the best a constant prediction (an untrained network's) reaches, the floor a budget must lift the
    trainers well above; ``mean`` over the labels."""
    files = [f"{case}{dataset_json['file_ending']}" for case in cases]
    reader, labels = _reader_and_labels(dataset_json, os.path.join(reference_folder, files[0]))
    per_case = {label: [] for label in labels}
    for name in files:
        reference = reader.read_seg(os.path.join(reference_folder, name))[0]
        for label in labels:
            hits = float((reference == label).sum())
            per_case[label].append(2 * hits / (hits + reference.size))
    dice = {str(label): float(np.mean(values)) for label, values in per_case.items()}
    return dict(dice, mean=float(np.mean(list(dice.values()))))


def hd95_per_class(reference_folder: str, prediction_folder: str, dataset_json: dict) -> Dict[str, dict]:
    """Mean HD95 per label over the cases where reference and prediction both hold it, read with nnU-Net's reader.

    ``scored`` counts those cases; ``missed`` the cases whose prediction lacks a label the reference has.
    """
    files = sorted(f for f in os.listdir(prediction_folder) if f.endswith(dataset_json['file_ending']))
    reader, labels = _reader_and_labels(dataset_json, os.path.join(prediction_folder, files[0]))
    values = {label: [] for label in labels}
    missed = dict.fromkeys(labels, 0)
    for name in files:
        reference, properties = reader.read_seg(os.path.join(reference_folder, name))
        prediction, _ = reader.read_seg(os.path.join(prediction_folder, name))
        for label in labels:
            ref, pred = reference[0] == label, prediction[0] == label
            if ref.any() and pred.any():
                values[label].append(hd95(ref, pred, list(properties['spacing'])))
            elif ref.any():
                missed[label] += 1
    return {str(label): {'hd95': float(np.mean(values[label])) if values[label] else float('nan'),
                         'scored': len(values[label]), 'missed': missed[label]} for label in labels}


TRAIN_SETTINGS = ('batch_size', 'patch_size', 'iterations_per_epoch', 'val_iterations', 'device', 'eval_at')
PREDICT_SETTINGS = ('disable_tta',)
TRAINER_SETTINGS = 'trainer_settings'


def trainer_settings(trainer: str) -> Dict[str, str]:
    """``trainer``'s class-level settings (decoder layout, recompute, loss switches: its public attributes that
    are plain values), stamped on each run, so that a run of a trainer whose settings changed since (a default
    that changed, say) is trained again instead of reused under the same name."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net narrates its search
        cls = recursive_find_trainer_class_by_name(trainer)
    values = ((k, getattr(cls, k)) for k in dir(cls) if not k.startswith('_'))
    return {k: repr(v) for k, v in values if isinstance(v, (bool, int, float, str, tuple, type(None)))}


def _run_folder(output: str, settings: dict) -> Optional[dict]:
    """A finished run's measurements in ``output`` if it ran with ``settings``. A run trained with other training
    settings is deleted; one trained alike but predicted otherwise keeps its final checkpoint and is predicted
    again. Stamps the folder with ``settings``."""
    stamp = os.path.join(output, 'benchmark_settings.json')
    if os.path.isdir(output):
        stamped = _read_json(stamp) if os.path.isfile(stamp) else None
        if stamped is None or not _trained_alike(stamped, settings):
            shutil.rmtree(output)
        elif (any(stamped.get(k) != settings.get(k) for k in PREDICT_SETTINGS)
              and os.path.isfile(os.path.join(output, 'benchmark.json'))):
            os.remove(os.path.join(output, 'benchmark.json'))
    measured = os.path.join(output, 'benchmark.json')
    if os.path.isfile(measured):
        return _read_json(measured)
    os.makedirs(output, exist_ok=True)
    with open(stamp, 'w') as f:
        json.dump(settings, f)
    return None


def _trained_alike(stamped: dict, settings: dict) -> bool:
    """Whether a run stamped with ``stamped`` was trained as ``settings`` asks: the same training settings, and
    the same trainer settings where both stamps name one (a trainer setting added or removed since kept the value
    its default stands for: the run is reused)."""
    def trained(stamp: dict) -> dict:
        return {k: v for k, v in stamp.items() if k not in PREDICT_SETTINGS + (TRAINER_SETTINGS,)}

    before, now = stamped.get(TRAINER_SETTINGS, {}), settings.get(TRAINER_SETTINGS, {})
    return trained(stamped) == trained(settings) and all(before[k] == now[k] for k in before.keys() & now.keys())


def _training_log(output: str, checkpoint: str = 'checkpoint_final.pth') -> dict:
    """nnU-Net's training log (per-epoch timestamps, losses, pseudo Dice) from one of the fold's checkpoints."""
    import torch

    return torch.load(os.path.join(output, checkpoint), map_location='cpu', weights_only=False)['logging']


def _epoch_seconds(logging: dict) -> List[float]:
    return [e - s for s, e in zip(logging['epoch_start_timestamps'], logging['epoch_end_timestamps'])]


def validation_cases(env: Dict[str, str], name: str, fold: int) -> List[str]:
    """The fold's validation cases in nnU-Net's split (written by the first training when the data set brings
    none)."""
    return _read_json(os.path.join(env['nnUNet_preprocessed'], name, 'splits_final.json'))[fold]['val']


def _validation_inputs(env: Dict[str, str], name: str, val_cases: List[str], inputs: str) -> None:
    """Links to the raw images of the fold's validation cases, as nnUNetv2_predict's input folder."""
    raw_images = os.path.join(env['nnUNet_raw'], name, 'imagesTr')
    os.makedirs(inputs, exist_ok=True)
    for image in os.listdir(raw_images):
        if image.rsplit('_', 1)[0] in val_cases and not os.path.exists(os.path.join(inputs, image)):
            os.symlink(os.path.join(raw_images, image), os.path.join(inputs, image))


def _scores(env: Dict[str, str], name: str, model: str, predictions: str, log: str) -> dict:
    """nnUNetv2_evaluate_folder's Dice and our HD95 of the predictions against the raw labels."""
    labels = os.path.join(env['nnUNet_raw'], name, 'labelsTr')
    run_logged(['nnUNetv2_evaluate_folder', labels, predictions, '-djfile', os.path.join(model, 'dataset.json'),
                '-pfile', os.path.join(model, 'plans.json'), '-o', os.path.join(predictions, 'summary.json'),
                '-np', env['nnUNet_def_n_proc'], '--chill'], env, log)
    summary = _read_json(os.path.join(predictions, 'summary.json'))
    return {'dice_per_class': {k: v['Dice'] for k, v in summary['mean'].items()},
            'dice_mean': summary['foreground_mean']['Dice'],
            'hd95_per_class': hd95_per_class(labels, predictions, _read_json(os.path.join(model, 'dataset.json')))}


def _model_folder(env: Dict[str, str], args: argparse.Namespace, tr: str) -> str:
    """nnU-Net's model folder of the generated trainer ``tr`` (its fold folders inside)."""
    return os.path.join(env['nnUNet_results'], dataset_id_and_name(args.dataset)[1],
                        f'{tr}__{BENCH_PLANS}__{args.configuration}')


def predict_in_process(env: Dict[str, str], args: argparse.Namespace, model: str, checkpoint: str, inputs: str,
                       predictions: str, log: str) -> None:
    """What nnUNetv2_predict does with the benchmark's arguments, in this process through nnU-Net's sequential
    path (nnUNetPredictor.predict_from_files_sequential): the same network, tiling and mirroring, without starting
    Python for the command and its worker pools. For the points of --eval-at, whose prediction is not timed."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    os.makedirs(predictions, exist_ok=True)
    with open(log, 'a') as f, contextlib.redirect_stdout(f), mock.patch.dict(os.environ, env):
        f.write(f"$ nnUNetPredictor (in this process) -i {inputs} -o {predictions} -f {args.fold} -chk {checkpoint}"
                f"{' --disable_tta' * args.disable_tta}\n")
        predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=not args.disable_tta,
                                    perform_everything_on_device=True, device=torch.device(args.device),
                                    allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(model, (args.fold,), checkpoint)
        predictor.predict_from_files_sequential(inputs, predictions, save_probabilities=False, overwrite=True)


def _predict_and_score(env: Dict[str, str], args: argparse.Namespace, tr: str, checkpoint: str, log: str,
                       logging: dict, final: bool = True) -> dict:
    """The prediction of the fold's validation cases with ``checkpoint`` of ``tr``'s fold, and their scores; the
    fold's training time and iterations up to that checkpoint, from its training log ``logging``. The ``final``
    checkpoint is predicted by nnUNetv2_predict, timed end to end; a point before it in this process."""
    dataset_id, name = dataset_id_and_name(args.dataset)
    model = _model_folder(env, args, tr)
    epoch_seconds = _epoch_seconds(logging)
    val_cases = validation_cases(env, name, args.fold)
    inputs = os.path.join(model, f'val_inputs_{args.fold}')
    _validation_inputs(env, name, val_cases, inputs)
    predictions = os.path.join(model, f'val_predictions_{args.fold}')
    shutil.rmtree(predictions, ignore_errors=True)
    print(f"predicting the {len(val_cases)} validation cases with {tr} ({checkpoint}) ...", flush=True)
    timed = {}
    if final:
        start = time.perf_counter()
        run_logged(['nnUNetv2_predict', '-i', inputs, '-o', predictions, '-d', str(dataset_id), '-c',
                    args.configuration, '-f', str(args.fold), '-tr', tr, '-p', BENCH_PLANS, '-device', args.device,
                    '-npp', '1', '-nps', '1', '-chk', checkpoint] + ['--disable_tta'] * args.disable_tta, env, log)
        timed['predict_seconds'] = time.perf_counter() - start
    else:
        predict_in_process(env, args, model, checkpoint, inputs, predictions, log)
    return {'iterations': len(epoch_seconds) * args.iterations_per_epoch, 'epochs': len(epoch_seconds),
            'train_seconds': float(sum(epoch_seconds)), **_scores(env, name, model, predictions, log),
            **timed, 'validation_cases': len(val_cases)}


def _scored_points(env: Dict[str, str], args: argparse.Namespace, tr: str, iterations: int, log: str) -> List[dict]:
    """The scores at each point of --eval-at before ``iterations`` whose snapshot the run has saved; points scored
    before are read from the run's points.json, new ones are scored and added there."""
    output = os.path.join(_model_folder(env, args, tr), f'fold_{args.fold}')
    cache = os.path.join(output, 'points.json')
    points = _read_json(cache) if os.path.isfile(cache) else []
    for n in args.eval_at or ():
        if n < iterations and n not in [p['iterations'] for p in points] \
                and os.path.isfile(os.path.join(output, snapshot_file(n))):
            points.append(_predict_and_score(env, args, tr, snapshot_file(n), log,
                                             _training_log(output, snapshot_file(n)), final=False))
            with open(cache, 'w') as f:
                json.dump(points, f, indent=1)
    return sorted(points, key=lambda p: p['iterations'])


def train_and_evaluate(env: Dict[str, str], args: argparse.Namespace, trainer: str, iterations: int,
                       log: str, run: int = 1, deadline: Optional[float] = None) -> dict:
    """Train one budgeted trainer on one fold (its ``run``-th run), time nnUNetv2_predict on its validation
    cases, evaluate them; the same at each point of --eval-at it reaches (``points``).

    A run finished earlier with the same settings is reused; one with other settings is deleted and run again;
    one stopped before its final checkpoint continues from its last checkpoint (nnUNetv2_train --c). Training
    stops at ``deadline`` (time.time()): the run's record then has ``stopped`` set and the points it reached.
    """
    dataset_id = dataset_id_and_name(args.dataset)[0]
    configuration, fold, device = args.configuration, args.fold, args.device
    tr = bench_name(trainer, iterations, run)
    output = os.path.join(_model_folder(env, args, tr), f'fold_{fold}')
    # settings left unset or off are left out, so runs from before a setting existed are reused
    settings = {k: getattr(args, k) for k in TRAIN_SETTINGS + PREDICT_SETTINGS if getattr(args, k) not in (None, False)}
    finished = _run_folder(output, dict(settings, **{TRAINER_SETTINGS: trainer_settings(trainer)}))
    if finished is not None:
        return finished
    if not os.path.isfile(os.path.join(output, 'checkpoint_final.pth')):
        resumed = os.path.isfile(os.path.join(output, 'checkpoint_latest.pth'))
        print(f"training {tr} (fold {fold}, run {run}{', from its last checkpoint' if resumed else ''}) ...",
              flush=True)
        try:
            run_logged(['nnUNetv2_train', str(dataset_id), configuration, str(fold), '-tr', tr, '-p', BENCH_PLANS,
                        '-device', device, '--c'], env, log,
                       timeout=None if deadline is None else max(1.0, deadline - time.time()))
        except CommandFailed:
            if deadline is None or time.time() < deadline:
                raise
            print(f"stopped {tr} at the time limit (--max-minutes)", flush=True)
            return {'trainer': trainer, 'bench_trainer': tr, 'run': run, 'iterations': iterations, 'stopped': True,
                    'points': _scored_points(env, args, tr, iterations, log)}
    points = _scored_points(env, args, tr, iterations, log)
    logging = _training_log(output)
    final = _predict_and_score(env, args, tr, 'checkpoint_final.pth', log, logging)
    result = {'trainer': trainer, 'bench_trainer': tr, 'run': run, **final, 'iterations': iterations,
              'seconds_per_iteration': final['train_seconds'] / max(1, iterations), 'malloc': malloc_note(env),
              'curve': {'ema_pseudo_dice': [float(v) for v in logging['ema_fg_dice']],
                        'train_loss': [float(v) for v in logging['train_losses']],
                        'val_loss': [float(v) for v in logging['val_losses']]}}
    if args.eval_at:
        result['points'] = points + [final]
    with open(os.path.join(output, 'benchmark.json'), 'w') as f:
        json.dump(result, f, indent=1)
    return result


def network_gflops(env: Dict[str, str], dataset: str, trainer: str, configuration: str = '2d') -> float:
    """GFLOPs of the trainer's network (inference) at the benchmark plan's patch."""
    import torch
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    name = dataset_id_and_name(dataset)[1]
    folder = os.path.join(env['nnUNet_preprocessed'], name)
    plans = _read_json(os.path.join(folder, f'{BENCH_PLANS}.json'))
    dataset_json = _read_json(os.path.join(folder, 'dataset.json'))
    plans['continue_training'] = False
    # the trainer's log file goes to a scratch folder, not among the benchmark's results
    with tempfile.TemporaryDirectory() as scratch, mock.patch.dict(os.environ, {
            'nnUNet_preprocessed': env['nnUNet_preprocessed'], 'nnUNet_raw': env['nnUNet_raw'],
            'nnUNet_results': scratch}):
        t = recursive_find_trainer_class_by_name(trainer)(plans, configuration, 0, dataset_json,
                                                          device=torch.device('cpu'))
    net = t.build_network_architecture(t.plans_manager, t.configuration_manager, len(dataset_json['channel_names']),
                                       t.label_manager.num_segmentation_heads, False).eval()
    x = torch.randn(1, len(dataset_json['channel_names']), *t.configuration_manager.patch_size)
    return count_flops(net, x) / 1e9


def plots(results: List[dict], gflops: Dict[str, float], out_prefix: str) -> List[str]:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    trainers = list(dict.fromkeys(r['trainer'] for r in results))
    colours = {t: plt.get_cmap('tab10')(i) for i, t in enumerate(trainers)}
    markers = {'equal_iterations': 'o', 'equal_time': 's'}

    def label(r: dict) -> str:
        """One legend entry per trainer and budget, on its first run."""
        if r.get('run', 1) > 1:
            return '_nolegend_'
        return f"{r['trainer'].replace('nnUNetTrainer', '') or 'stock'} ({r['budget'].replace('_', ' ')})"

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        ax.scatter(gflops[r['trainer']], r['dice_mean'], color=colours[r['trainer']], marker=markers[r['budget']],
                   s=40 if r['budget'] == 'equal_time' else 25, alpha=0.8, label=label(r))
    ax.set_xlabel('GFLOPs per patch (inference)')
    ax.set_ylabel('mean foreground Dice (validation fold)')
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(f'{out_prefix}_dice_vs_gflops.png', dpi=120)
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        curve = r['curve']['ema_pseudo_dice']
        per_epoch = r['iterations'] / max(1, len(curve))
        ax.plot([per_epoch * (i + 1) for i in range(len(curve))], curve, color=colours[r['trainer']],
                marker=markers[r['budget']], markersize=3, linestyle='-' if r['budget'] == 'equal_time' else '--',
                label=label(r))
    ax.set_xlabel('training iterations')
    ax.set_ylabel('EMA pseudo Dice (nnU-Net)')
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(f'{out_prefix}_curves.png', dpi=120)
    return [f'{out_prefix}_dice_vs_gflops.png', f'{out_prefix}_curves.png']


def point_plots(runs: Sequence[dict], seconds: Optional[Dict[str, float]], out_prefix: str) -> str:
    """Dice at each --eval-at point against iterations and, with ``seconds``, against training minutes: each run
    thin, each trainer's mean thick, the runs' range shaded."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    records = point_records(runs)
    trainers = list(dict.fromkeys(r['trainer'] for r in records))
    axes_x = [('training iterations', lambda t, n: n)]
    if seconds:
        axes_x.append(('training minutes (seconds per step in turn with stock)',
                       lambda t, n: _minutes(t, n, seconds)))
    fig, axes = plt.subplots(1, len(axes_x), figsize=(5.5 * len(axes_x), 4), squeeze=False)
    for ax, (xlabel, x) in zip(axes[0], axes_x):
        for i, trainer in enumerate(trainers):
            colour = plt.get_cmap('tab10')(i)
            mine = [r for r in records if r['trainer'] == trainer]
            if x(trainer, 1) is None:
                continue
            for run in sorted({r['run'] for r in mine}):
                points = sorted((r['iterations'], r['dice_mean']) for r in mine if r['run'] == run)
                ax.plot([x(trainer, n) for n, _ in points], [d for _, d in points], color=colour, lw=0.8, alpha=0.6)
            iterations = sorted({r['iterations'] for r in mine})
            dice = [[r['dice_mean'] for r in mine if r['iterations'] == n] for n in iterations]
            xs = [x(trainer, n) for n in iterations]
            ax.plot(xs, [np.mean(d) for d in dice], color=colour, lw=2.5, marker='o', markersize=4,
                    label=trainer.replace('nnUNetTrainer', '') or 'stock')
            ax.fill_between(xs, [min(d) for d in dice], [max(d) for d in dice], color=colour, alpha=0.2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel('mean foreground Dice (held-out cases)')
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(f'{out_prefix}_dice_at_iterations.png', dpi=120)
    plt.close(fig)
    return f'{out_prefix}_dice_at_iterations.png'


def _hd95_cell(result: dict) -> str:
    per_class = result.get('hd95_per_class')
    if not per_class:
        return 'not measured'
    values = [v['hd95'] for v in per_class.values() if v['scored']]
    scored = sum(v['scored'] for v in per_class.values())
    total = scored + sum(v['missed'] for v in per_class.values())
    mean = f'{np.mean(values):.1f}' if values else 'none'
    return f'{mean} ({scored}/{total})'


def default_trainers(configuration: str) -> List[str]:
    """Stock nnU-Net and every EMCAD trainer for a configuration."""
    return [STOCK] + (EMCAD_TRAINERS if configuration == '2d' else EMCAD_3D_TRAINERS)


def default_name(dataset: str, configuration: str) -> str:
    """The result files' name when --name is not given."""
    return f'accuracy_{dataset}' + ('' if configuration == '2d' else f'_{configuration}')


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces a run's settings (work and output folders left at their defaults, and
    --max-minutes, which decides when a command stops, not what it measures)."""
    return reproduce_command('benchmarks/accuracy.py', build_parser(), args,
                             leave_out=('work', 'out', 'max_minutes'),
                             defaults={'trainers': default_trainers(args.configuration),
                                       'name': default_name(args.dataset, args.configuration)})


def summary_lines(results: List[dict], trainers: List[str]) -> List[str]:
    """Mean and spread per trainer and budget, against stock, and the goals."""
    lines = ['', '## Mean and spread over the runs', '',
             "Spread: max - min of the runs' mean Dice, in points. A difference to stock not larger than the larger "
             "of the two spreads is a tie.", '',
             '| trainer | budget | runs | iterations | train time | Dice per run | mean Dice | spread | '
             'against stock | nnUNetv2_predict |', '|---|---|---:|---:|---:|---|---:|---:|---|---:|']
    for budget in ('equal_iterations', 'equal_time'):
        stock = runs_summary(results, STOCK, budget)
        for trainer in trainers:
            mine = runs_summary(results, trainer, budget)
            if mine is None:
                continue
            against = '' if trainer == STOCK or stock is None else versus_stock(mine, stock)[1]
            lines.append(f"| {trainer} | {budget.replace('_', ' ')} | {mine['runs']} | {mine['iterations']:.0f} | "
                         f"{mine['train_seconds'] / 60:.1f} min | {', '.join(f'{d:.3f}' for d in mine['dice_per_run'])}"
                         f" | {mine['dice']:.3f} | {100 * mine['spread']:.1f} | {against} | "
                         f"{mine['predict_seconds']:.0f} s |")
    stock = runs_summary(results, STOCK, 'equal_iterations')
    if stock is None or trainers == [STOCK]:
        return lines
    timed_stock = runs_summary(results, STOCK, 'equal_time')
    lines += ['', '## Goals', '', '| trainer | equal iterations (goal: not behind stock) | '
              'equal time (goal: ahead of stock) | predict speed-up (goal >= 1.5x) |', '|---|---|---|---:|']
    for trainer in trainers:
        mine = runs_summary(results, trainer, 'equal_iterations')
        if trainer == STOCK or mine is None:
            continue
        side, words = versus_stock(mine, stock)
        cells = [f"{words} ({'not judged' if side == 'spread unknown' else verdict(side != 'behind')})"]
        timed = runs_summary(results, trainer, 'equal_time')
        if timed and timed_stock:
            side, words = versus_stock(timed, timed_stock)
            cells.append(f"{words} ({'not judged' if side == 'spread unknown' else verdict(side == 'ahead')})")
        else:
            cells.append('not run')
        speed = stock['predict_seconds'] / mine['predict_seconds']
        lines.append(f"| {trainer} | {' | '.join(cells)} | {speed:.2f}x ({verdict(speed >= 1.5)}) |")
    return lines


def patch_text(args: argparse.Namespace) -> str:
    """The training patch as the report names it."""
    return 'x'.join(map(str, args.patch_size)) + " (--patch-size, the planner's topology for it)" \
        if args.patch_size else "the plan's"


def step_seconds(path: str, batch_size: int, patch_size: Sequence[int]) -> Dict[str, float]:
    """Each trainer's seconds per training step in an against_stock report (eager, in turn with stock; stock's
    is the mean of its measurements beside every trainer). The report must have measured at ``batch_size`` and
    ``patch_size``; SystemExit names the command that does."""
    rows = _read_json(path)['trainers']
    for row in rows:
        if row['batch'] != batch_size or list(row['patch_size']) != list(patch_size) or 'eager' not in row:
            raise SystemExit(
                f"--step-times {path}: {row['name']} was measured at batch {row['batch']}, patch "
                f"{'x'.join(map(str, row['patch_size']))}{'' if 'eager' in row else ', not eager'}; this benchmark "
                f"trains at batch {batch_size}, patch {'x'.join(map(str, patch_size))}. Measure with: python "
                f"benchmarks/against_stock.py --batch {batch_size} --patch-size {' '.join(map(str, patch_size))} "
                f"--modes eager --trainers TRAINER ... --name NAME")
    seconds = {row['name']: row['eager']['step_ms']['trainer'] / 1000 for row in rows}
    seconds[STOCK] = float(np.mean([row['eager']['step_ms']['stock'] for row in rows])) / 1000
    return seconds


def _minutes(trainer: str, iterations: int, seconds: Optional[Dict[str, float]]) -> Optional[float]:
    return None if not seconds or trainer not in seconds else iterations * seconds[trainer] / 60


def points_lines(runs: Sequence[dict], args: argparse.Namespace, seconds: Optional[Dict[str, float]]) -> List[str]:
    """The --eval-at section: per point and trainer, the runs' Dice, mean, spread and verdict against stock's
    runs at the same point; which points each run reached."""
    minutes = f"the point's iterations times the trainer's seconds per training step, measured in turn with " \
        f"stock ({os.path.basename(args.step_times)}; the step alone, without data loading and nnU-Net's " \
        f"per-epoch validation), not these runs' wall clock" if seconds else 'not given (--step-times)'
    lines = ['', '## Dice at each evaluated iteration', '',
             f"Every equal-iteration run scored with the network it had at each point of --eval-at (the last is "
             f"its final checkpoint) on the same held-out cases. A point before the last is a network part-way "
             f"through the whole schedule (nnU-Net's learning rate decays over all {args.iterations} iterations), "
             f"not what a training of that many iterations would reach. Minutes: {minutes}.", '',
             '| trainer | iterations | minutes | runs | Dice per run | mean Dice | spread | against stock |',
             '|---|---:|---:|---:|---|---:|---:|---|']
    for n, trainer, mine, stock in point_summaries(point_records(runs), args.eval_at):
        m = _minutes(trainer, n, seconds)
        against = '' if trainer == STOCK or stock is None else versus_stock(mine, stock)[1]
        lines.append(f"| {trainer} | {n} | {'not measured' if m is None else f'{m:.1f}'} | {mine['runs']} | "
                     f"{', '.join(f'{d:.3f}' for d in mine['dice_per_run'])} | {mine['dice']:.3f} | "
                     f"{100 * mine['spread']:.1f} | {against} |")
    reached = [f"{r['trainer']} run {r.get('run', 1)}: "
               f"{', '.join(str(p['iterations']) for p in r['points']) or 'none yet'}"
               + (' (stopped; the same command continues it)' if r.get('stopped') else '')
               for r in runs if r['budget'] == 'equal_iterations' and 'points' in r]
    lines += ['', 'Points reached: ' + '; '.join(reached) + '.']
    return lines


def report(results: List[dict], gflops: Dict[str, float], args: argparse.Namespace, info: Dict[str, str],
           floor: Optional[Dict[str, float]] = None, stopped: Sequence[dict] = (),
           seconds: Optional[Dict[str, float]] = None) -> str:
    """The Markdown report; ``floor`` is ``constant_dice`` on the validation cases, when known; ``stopped`` the
    runs stopped at --max-minutes, ``seconds`` the trainers' seconds per step (``step_seconds``)."""
    labels = sorted({k for r in results for k in r['dice_per_class']}, key=int)
    equal_time = "not run (--no-equal-time)" if args.no_equal_time else \
        "stock nnU-Net's mean training time over its runs"
    # runs measured before the malloc settings existed ran under glibc's defaults
    malloc = ' / '.join(sorted({r.get('malloc', malloc_note({})) for r in results}))
    lines = [f"# Accuracy through the nnU-Net pipeline: {dataset_id_and_name(args.dataset)[1]} {args.configuration}, "
             f"fold {args.fold}, {args.iterations} iterations", '',
             f"Machine: {info['cpu']}, {info['cores']} cores, GPU: {info['gpu']}; device {args.device}; {malloc}. "
             f"Budget: batch {args.batch_size}, patch {patch_text(args)}, {args.iterations_per_epoch} iterations "
             f"per epoch; equal iterations = {args.iterations} iterations each; equal time = {equal_time}; "
             f"prediction {'without' if args.disable_tta else 'with'} nnU-Net's test-time mirroring"
             f"{' (--disable-tta)' if args.disable_tta else ''}. "
             f"Runs: {args.runs} per trainer and budget, all on fold {args.fold} (nnU-Net seeds only its split: each "
             f"run draws another initialisation, other batches and augmentations; all are scored on the same "
             f"held-out cases with the final checkpoint). "
             f"This is a short CPU budget, far from nnU-Net's 1000 x 250 iterations: read it as a comparison of "
             f"early training, not as final accuracy.", '', f"Reproduce: `{command_line(args)}`", '',
             '| trainer | budget | run | iterations | train time | GFLOPs | '
             + ' | '.join(f'Dice {k}' for k in labels)
             + ' | mean Dice | mean HD95 (scored) | nnUNetv2_predict (val cases) |',
             '|---|---|---:|---:|---:|---:|' + '---:|' * len(labels) + '---:|---:|---:|']
    for r in results:
        lines.append(f"| {r['trainer']} | {r['budget'].replace('_', ' ')} | {r.get('run', 1)} | {r['iterations']} | "
                     f"{r['train_seconds'] / 60:.1f} min | {gflops[r['trainer']]:.1f} | "
                     + ' | '.join(f"{r['dice_per_class'].get(k, float('nan')):.3f}" for k in labels)
                     + f" | {r['dice_mean']:.3f} | {_hd95_cell(r)} | "
                     f"{r['predict_seconds']:.0f} s ({r['validation_cases']}) |")
    absent = [t for t in default_trainers(args.configuration) if t not in gflops]
    lines += ['', "Dice: nnUNetv2_evaluate_folder on the nnUNetv2_predict output. HD95: in the images' spacing "
              "units (mm; pixels for PNG), mean over classes of the per-class mean over cases where reference and "
              "prediction both hold the class; (scored) counts those (case, class) pairs out of all pairs whose "
              "reference holds the class."]
    if floor is not None:
        stock = runs_summary(results, STOCK, 'equal_iterations')
        margin = '' if stock is None else f"; stock nnU-Net's mean at equal iterations lies " \
            f"{100 * (stock['dice'] - floor['mean']):.1f} points above it"
        lines += ['', f"Floor: predicting a class everywhere, as an untrained network may, scores a mean Dice of "
                  f"{floor['mean']:.3f} on these cases ("
                  + ', '.join(f"class {k}: {v:.3f}" for k, v in floor.items() if k != 'mean') + f"){margin}."]
    if absent:
        lines += ['', f"Not in this run: {', '.join(absent)} (add them with --trainers)."]
    for budget, skipped in (('equal_iterations', False), ('equal_time', args.no_equal_time)):
        done = {t: len([r for r in results if r['trainer'] == t and r['budget'] == budget]) for t in args.trainers}
        missing = [] if skipped else [t for t in args.trainers if done[t] < args.runs]
        if missing:
            lines += ['', f"{budget.replace('_', ' ').capitalize()} not measured yet for "
                      f"{', '.join(f'{t} ({done[t]} of {args.runs} runs)' for t in missing)}: the benchmark was "
                      f"stopped (or is still running); the same command resumes it, reusing the finished runs."]
    lines += summary_lines(results, list(dict.fromkeys(r['trainer'] for r in results)))
    if args.eval_at:
        lines += points_lines(results + list(stopped), args, seconds)
        lines += ['', f"![Dice at each evaluated iteration]({args.name}_dice_at_iterations.png)"]
    lines += ['', f"![Dice against GFLOPs]({args.name}_dice_vs_gflops.png)",
              f"![Training curves]({args.name}_curves.png)", '']
    return '\n'.join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--dataset', default='acdc', help="acdc (default), isbi (both from ../shared/data) or the "
                        "DatasetNNN_Name of a data set of your own in --raw")
    parser.add_argument('--raw', help='the nnU-Net raw folder holding --dataset DatasetNNN_Name')
    parser.add_argument('--configuration', default='2d', help='2d (default) or 3d_fullres / 3d_lowres')
    parser.add_argument('--trainers', nargs='+', help='default: stock and the EMCAD trainers for the configuration')
    parser.add_argument('--iterations', type=int, default=200, help='equal-iteration budget (default 200)')
    parser.add_argument('--iterations-per-epoch', type=int, default=25)
    parser.add_argument('--val-iterations', type=int, default=5, help="nnU-Net's pseudo-Dice iterations per epoch")
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--patch-size', type=int, nargs='+', help="the training patch (default: the plan's), with "
                        "the network topology nnU-Net's planner gives that patch")
    parser.add_argument('--runs', type=int, default=1, help='runs per trainer and budget, on the same fold '
                        '(default 1; from 2 on the report gives the spread and calls ties)')
    parser.add_argument('--disable-tta', action='store_true', help="predict without nnU-Net's test-time mirroring "
                        "(nnUNetv2_predict --disable_tta), every trainer alike: 4x fewer forward passes in 2D")
    parser.add_argument('--fold', type=int, default=0)
    parser.add_argument('--no-equal-time', action='store_true', help='run the equal-iteration budget only')
    parser.add_argument('--eval-at', type=int, nargs='+', help='iteration counts at which every equal-iteration '
                        'run is also scored (multiples of --iterations-per-epoch; --iterations is always one): each '
                        'run keeps its network at those points and the report gives Dice against iterations')
    parser.add_argument('--max-minutes', type=float, help='stop training after this many minutes (the run in '
                        'progress keeps its last checkpoint; the same command continues it with nnUNetv2_train --c)')
    parser.add_argument('--step-times', help="an against_stock report's JSON measured at this benchmark's batch "
                        "and patch (benchmarks/results/against_stock*.json): its eager seconds per training step, in "
                        "turn with stock, put the --eval-at points on a training-minutes axis")
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--work', default=os.path.join(CACHE, 'accuracy'), help='nnU-Net folders (kept, reused)')
    parser.add_argument('--name', help='result file name (default accuracy_<dataset>, plus _<configuration> '
                        'if not 2d); give another to keep a second budget beside the first')
    parser.add_argument('--out', default=RESULTS)
    return parser


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """The benchmark's settings, checked, with the default trainers filled in."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.trainers is None:
        args.trainers = default_trainers(args.configuration)
    args.name = args.name or default_name(args.dataset, args.configuration)
    try:
        dataset_id_and_name(args.dataset)
    except ValueError as e:
        parser.error(str(e))
    if args.dataset in DATASETS and args.raw:
        parser.error(f'--raw is for a data set of your own (--dataset DatasetNNN_Name); {args.dataset} comes from '
                     f'{SHARED_DATA}')
    if args.dataset not in DATASETS and not args.raw:
        parser.error(f'--dataset {args.dataset} needs --raw, the nnU-Net raw folder that holds it')
    if args.runs < 1:
        parser.error('--runs must be at least 1')
    if args.iterations % args.iterations_per_epoch:
        parser.error('--iterations must be a multiple of --iterations-per-epoch')
    if args.eval_at:
        wrong = [n for n in args.eval_at if n <= 0 or n > args.iterations or n % args.iterations_per_epoch]
        if wrong:
            parser.error(f"--eval-at {' '.join(map(str, wrong))}: give multiples of --iterations-per-epoch "
                         f"({args.iterations_per_epoch}) up to --iterations ({args.iterations})")
        args.eval_at = sorted(set(args.eval_at) | {args.iterations})
    if args.step_times and not args.eval_at:
        parser.error('--step-times puts the --eval-at points on a minutes axis: give --eval-at too')
    if STOCK not in args.trainers:
        parser.error(f'--trainers must include {STOCK}: the budgets and goals are relative to it')
    return args


def equal_time_iterations(stock_seconds: float, seconds_per_iteration: float, per_epoch: int) -> int:
    """The iterations a trainer taking ``seconds_per_iteration`` trains in stock's ``stock_seconds``, to the
    nearest whole epoch of ``per_epoch`` iterations, at least one."""
    return per_epoch * max(1, round(stock_seconds / seconds_per_iteration / per_epoch))


def main(argv=None) -> int:
    args = parse_args(argv)

    root = os.path.join(args.work, args.dataset)
    log = os.path.join(root, 'commands.log')
    trainer_dir = os.path.join(root, 'trainers')
    env = prepare(args.dataset, root, args.batch_size, log, args.configuration, trainer_dir, args.raw,
                  args.patch_size)
    gflops = {t: network_gflops(env, args.dataset, t, args.configuration) for t in args.trainers}
    info = machine()
    results, stopped = [], []
    seconds = None if args.step_times is None else step_seconds(args.step_times, args.batch_size, _read_json(
        os.path.join(env['nnUNet_preprocessed'], dataset_id_and_name(args.dataset)[1], f'{BENCH_PLANS}.json'))
        ['configurations'][args.configuration]['patch_size'])

    name = dataset_id_and_name(args.dataset)[1]
    floor: Optional[Dict[str, float]] = None

    def publish() -> None:
        nonlocal floor
        os.makedirs(args.out, exist_ok=True)
        pngs = plots(results, gflops, os.path.join(args.out, args.name))
        splits = os.path.join(env['nnUNet_preprocessed'], name, 'splits_final.json')
        if floor is None and os.path.isfile(splits):  # once (the first training writes a split the data set lacks)
            floor = constant_dice(os.path.join(env['nnUNet_raw'], name, 'labelsTr'),
                                  validation_cases(env, name, args.fold),
                                  _read_json(os.path.join(env['nnUNet_preprocessed'], name, 'dataset.json')))
        if args.eval_at:
            pngs.append(point_plots(results + stopped, seconds, os.path.join(args.out, args.name)))
        payload = {'machine': info, 'settings': vars(args), 'gflops': gflops, 'constant_dice': floor,
                   'step_seconds': seconds, 'results': results, 'stopped_runs': stopped, 'plots': pngs}
        write_results(args.name, payload, report(results, gflops, args, info, floor, stopped, seconds), args.out)

    budgets = [(t, args.iterations) for t in args.trainers]
    write_trainers(trainer_dir, budgets, args.iterations_per_epoch, args.val_iterations, args.runs, args.eval_at)
    deadline = None if args.max_minutes is None else time.time() + 60 * args.max_minutes

    def measured(trainer: str, iterations: int, run: int, budget: str) -> bool:
        """Train and score one run and publish it; False when it stopped at --max-minutes."""
        r = dict(train_and_evaluate(env, args, trainer, iterations, log, run, deadline), budget=budget)
        (stopped if r.get('stopped') else results).append(r)
        publish()
        if r.get('stopped'):
            print(f"stopped after --max-minutes {args.max_minutes:g}: the same command continues "
                  f"{r['bench_trainer']} from its last checkpoint and runs the rest", flush=True)
        return not r.get('stopped')

    for run in range(1, args.runs + 1):
        for trainer in args.trainers:
            if not measured(trainer, args.iterations, run, 'equal_iterations'):
                return 0
    if not args.no_equal_time:
        stock_seconds = runs_summary(results, STOCK, 'equal_iterations')['train_seconds']
        timed = []
        for trainer in args.trainers:
            seconds = runs_summary(results, trainer, 'equal_iterations')['train_seconds']
            n = equal_time_iterations(stock_seconds, seconds / args.iterations, args.iterations_per_epoch)
            if trainer == STOCK or n == args.iterations:
                results += [dict(r, budget='equal_time') for r in list(results)
                            if r['trainer'] == trainer and r['budget'] == 'equal_iterations']
            else:
                timed.append((trainer, n))
        publish()
        write_trainers(trainer_dir, budgets + timed, args.iterations_per_epoch, args.val_iterations, args.runs)
        for trainer, n in timed:  # a trainer's runs together: a benchmark stopped part-way has whole trainers
            for run in range(1, args.runs + 1):
                if not measured(trainer, n, run, 'equal_time'):
                    return 0
    return 0


if __name__ == '__main__':
    sys.exit(main())
