"""The demo: a short but real EMCAD training through nnU-Net's own commands, then prediction, evaluation and
overlays.

Steps: write a small real data set in nnU-Net's raw format, ``nnUNetv2_plan_and_preprocess``, ``nnUNetv2_train``
with a short-schedule subclass of the chosen trainer (generated into the work folder and found through
``nnUNet_extTrainer``), ``nnUNetv2_predict`` on held-out cases, ``nnUNetv2_evaluate_folder``, and a PNG of image /
ground truth / prediction. nnU-Net's output goes to log files; the demo prints its steps, one line per epoch,
the Dice per class and where everything is.
"""
import json
import os
import re
import time
from typing import Callable, Dict, List, Optional

import numpy as np

from nnunet_emcad.commands import SOURCE_ROOT, nnunet_env, run_logged
from nnunet_emcad.demo_data import (ACDC_SOURCE, PYCERR_SOURCE, SYNTHETIC_SOURCE, acdc_subset,
                                    convert_rtstruct_dataset, fetch_pycerr_dicom, make_synthetic_dataset)
from nnunet_emcad.schedules import PROGRESS_PREFIX, Schedule, write_trainer_module

DATA_CHOICES = ('auto', 'acdc', 'lungct', 'synthetic')
DATASET_IDS = {'acdc': 991, 'lungct': 992, 'synthetic': 993}


def shared_data_dir() -> Optional[str]:
    """The project's shared data folder (``$NNUNET_EMCAD_SHARED_DATA``, or ``../shared/data`` of a clone)."""
    candidates = [os.environ.get('NNUNET_EMCAD_SHARED_DATA'), os.path.join(SOURCE_ROOT, '..', 'shared', 'data'),
                  os.path.join(os.getcwd(), '..', 'shared', 'data')]
    for path in candidates:
        if path and os.path.isfile(os.path.join(path, 'Dataset027_ACDC', 'splits_final.json')):
            return os.path.abspath(path)
    return None


def _split(preprocessed: str, train: List[str], val: List[str]) -> None:
    """One fold: nnU-Net's five-fold default needs five cases, and ACDC's frames must stay together."""
    os.makedirs(preprocessed, exist_ok=True)
    with open(os.path.join(preprocessed, 'splits_final.json'), 'w') as f:
        json.dump([{'train': train, 'val': val}], f, indent=1)


def prepare_data(choice: str, raw: str, preprocessed: str, cache: str,
                 say: Callable[[str], None]) -> Dict[str, str]:
    """Write the chosen data set (``auto``: ACDC, else lung CT from PyPI, else generated); returns its facts."""
    if choice in ('auto', 'acdc'):
        shared = shared_data_dir()
        if shared:
            folder, training = acdc_subset(os.path.join(shared, 'Dataset027_ACDC'), raw, DATASET_IDS['acdc'],
                                           train_patients=12, test_patients=4)
            _split(os.path.join(preprocessed, os.path.basename(folder)), training[:-4], training[-4:])
            return {'kind': 'acdc', 'folder': folder, 'source': ACDC_SOURCE,
                    'note': '10 training and 2 validation patients (both frames), 4 test patients'}
        if choice == 'acdc':
            raise SystemExit("ACDC needs the project's shared data (../shared/data/Dataset027_ACDC) or "
                             "NNUNET_EMCAD_SHARED_DATA; try --data lungct")
        say("ACDC is not here (no ../shared/data); fetching real lung CT from PyPI instead")
    if choice in ('auto', 'lungct'):
        try:
            dicom = fetch_pycerr_dicom(cache)
            folder = convert_rtstruct_dataset(dicom, raw, DATASET_IDS['lungct'])
        except (RuntimeError, ImportError) as e:
            if choice == 'lungct':
                raise SystemExit(f"lung CT unavailable: {e}")
            say(f"lung CT unavailable ({str(e).splitlines()[0]}); using generated data")
        else:
            cases = sorted(f[:-len('.nii.gz')] for f in os.listdir(os.path.join(folder, 'labelsTr')))
            os.makedirs(os.path.join(folder, 'imagesTs'), exist_ok=True)
            os.makedirs(os.path.join(folder, 'labelsTs'), exist_ok=True)
            held_out = cases[2]
            for sub, suffix in (('images', '_0000.nii.gz'), ('labels', '.nii.gz')):
                target = os.path.join(folder, f'{sub}Ts', held_out + suffix)
                if not os.path.lexists(target):
                    os.symlink(os.path.join(folder, f'{sub}Tr', held_out + suffix), target)
            _split(os.path.join(preprocessed, os.path.basename(folder)),
                   [c for c in cases if c != held_out], [held_out])
            return {'kind': 'lungct', 'folder': folder, 'source': PYCERR_SOURCE,
                    'note': f'3 training patients; {held_out} held out for validation and test (4 patients is '
                            f'all there is: expect a rough tumour outline)'}
    folder = make_synthetic_dataset(raw, DATASET_IDS['synthetic'], n_train=20, n_test=4, name='Synthetic')
    return {'kind': 'synthetic', 'folder': folder, 'source': SYNTHETIC_SOURCE,
            'note': '20 training cases (nnU-Net 5-fold split, fold 0), 4 test cases'}


def write_demo_trainer(folder: str, base: str, schedule: Schedule) -> str:
    """A module with ``<base>_demo``, the short schedule, for nnU-Net to find through ``nnUNet_extTrainer``."""
    name = f'{base}_demo'
    write_trainer_module(os.path.join(folder, 'nnunet_emcad_demo_trainer.py'),
                         f'Generated by nnunet-emcad demo: {base} on a short schedule.',
                         [(name, base, 'nnunet_emcad.trainers', schedule)], progress=True)
    return name


class _EpochPrinter:
    """Turns nnU-Net's training output into one printed line per epoch, and progress lines within an epoch.

    A progress line (iterations done, an ETA for the training from the pace so far) is printed half-way
    through each epoch and whenever ``quiet_s`` seconds passed without a printed line.
    """

    PATTERNS = {'epoch': r'Epoch (\d+)$', 'train': r'train_loss (\S+)$', 'val': r'val_loss (\S+)$',
                'dice': r'Pseudo dice (.*)$', 'time': r'Epoch time: (.*)$'}
    PROGRESS = re.escape(PROGRESS_PREFIX) + r' epoch (\d+) iteration (\d+)/(\d+)$'

    def __init__(self, epochs: int, say: Callable[[str], None], quiet_s: float = 20.0):
        self.epochs, self.say, self.quiet_s, self.values = epochs, say, quiet_s, {}
        self.first = None  # (time, iterations done) at the first progress line: the pace is measured from there
        self.last_said = time.perf_counter()

    def _say(self, text: str) -> None:
        self.say(text)
        self.last_said = time.perf_counter()

    def _progress(self, epoch: int, iteration: int, per_epoch: int) -> None:
        now, done, total = time.perf_counter(), epoch * per_epoch + iteration, self.epochs * per_epoch
        if self.first is None:
            self.first = now, done
        if done == self.first[1] or (iteration != per_epoch // 2 and now - self.last_said < self.quiet_s):
            return
        eta = (now - self.first[0]) / (done - self.first[1]) * (total - done)
        left = f'{eta / 60:.1f} min' if eta >= 120 else f'{eta:.0f} s'
        self._say(f"  epoch {epoch + 1}/{self.epochs}: iteration {iteration}/{per_epoch} ({done}/{total} of the "
                  f"training), about {left} to go")

    def __call__(self, line: str) -> None:
        text = re.sub(r'^\d{4}-\d\d-\d\d [\d:.]+: ', '', line.strip())
        progress = re.match(self.PROGRESS, text)
        if progress:
            self._progress(*map(int, progress.groups()))
            return
        for key, pattern in self.PATTERNS.items():
            match = re.match(pattern, text)
            if match:
                self.values[key] = match.group(1)
        if 'time' in self.values:
            dice = ', '.join(f'{float(d):.3f}' for d in re.findall(r'(?<![\w.])\d+\.\d+', self.values.get('dice', '')))
            train, val = (float(self.values.get(key, 'nan')) for key in ('train', 'val'))
            self._say(f"  epoch {int(self.values.get('epoch', -1)) + 1}/{self.epochs}: train loss {train:.3f}, "
                      f"val loss {val:.3f}, pseudo Dice [{dice}], {self.values['time']}")
            self.values = {}


def overlay_png(dataset_folder: str, prediction_folder: str, out_file: str, max_cases: int = 4) -> str:
    """Image / ground truth / prediction of the test cases, each at its slice with the most foreground."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    with open(os.path.join(dataset_folder, 'dataset.json')) as f:
        dataset_json = json.load(f)
    ending = dataset_json['file_ending']
    cases = sorted(f[:-len(ending)] for f in os.listdir(os.path.join(dataset_folder, 'labelsTs')))[:max_cases]
    reader = determine_reader_writer_from_dataset_json(
        dataset_json, os.path.join(dataset_folder, 'labelsTs', cases[0] + ending), verbose=False)()
    labels = sorted(dataset_json['labels'].items(), key=lambda item: item[1])
    colours = ListedColormap([(0, 0, 0, 0), (1, 0.2, 0.2, 0.6), (0.2, 1, 0.2, 0.6), (0.3, 0.5, 1, 0.6),
                              (1, 1, 0.2, 0.6)][:max(2, len(labels))])
    fig, axes = plt.subplots(len(cases), 3, figsize=(9, 3 * len(cases)), squeeze=False)
    for row, case in zip(axes, cases):
        image, _ = reader.read_images([os.path.join(dataset_folder, 'imagesTs', f'{case}_0000{ending}')])
        truth, _ = reader.read_seg(os.path.join(dataset_folder, 'labelsTs', case + ending))
        prediction, _ = reader.read_seg(os.path.join(prediction_folder, case + ending))
        z = int(np.argmax((truth[0] > 0).sum(axis=(1, 2))))
        for ax, (title, mask) in zip(row, (('image', None), ('ground truth', truth), ('prediction', prediction))):
            ax.imshow(image[0, z], cmap='gray')
            if mask is not None:
                ax.imshow(mask[0, z], cmap=colours, vmin=0, vmax=colours.N - 1, interpolation='nearest')
            ax.set_title(f'{case} slice {z}: {title}' if title == 'image' else title, fontsize=8)
            ax.axis('off')
    fig.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=colours(v)) for _, v in labels[1:]],
               labels=[name for name, _ in labels[1:]], loc='lower center', ncol=len(labels) - 1)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(out_file, dpi=80)
    plt.close(fig)
    return out_file


def run_demo(workdir: str, data: str, trainer: str, schedule: Schedule, device: str,
             say: Callable[[str], None] = print) -> Dict[str, float]:
    """The whole demo; returns the test Dice per class name (and ``mean``)."""
    workdir = os.path.abspath(workdir)
    logs = os.path.join(workdir, 'logs')
    os.makedirs(logs, exist_ok=True)
    trainers = os.path.join(workdir, 'trainers')
    env = nnunet_env(*(os.path.join(workdir, f'nnUNet_{name}') for name in ('raw', 'preprocessed', 'results')),
                     trainer_dir=trainers)
    start = time.perf_counter()

    def step(n: int, text: str) -> None:
        say(f"[{n}/5 {time.perf_counter() - start:5.0f} s] {text}")

    step(1, f"data set ({data}) in {env['nnUNet_raw']}")
    facts = prepare_data(data, env['nnUNet_raw'], env['nnUNet_preprocessed'], os.path.join(workdir, 'cache'), say)
    folder = facts['folder']
    dataset = os.path.basename(folder)
    dataset_id = str(DATASET_IDS[facts['kind']])
    say(f"  {dataset}: {facts['note']}\n  source: {facts['source']}")

    step(2, f"nnUNetv2_plan_and_preprocess -d {dataset_id} -c 2d (log: {logs}/plan.log)")
    if not os.path.isfile(os.path.join(env['nnUNet_preprocessed'], dataset, 'nnUNetPlans.json')):
        run_logged(['nnUNetv2_plan_and_preprocess', '-d', dataset_id, '-c', '2d', '-np', env['nnUNet_def_n_proc']],
                   env, os.path.join(logs, 'plan.log'))

    demo_trainer = write_demo_trainer(trainers, trainer, schedule)
    step(3, f"nnUNetv2_train {dataset_id} 2d 0 -tr {demo_trainer} -device {device}: {schedule.epochs} epochs x "
            f"{schedule.iterations} iterations, batch {schedule.batch_size} (log: {logs}/train.log)")
    run_logged(['nnUNetv2_train', dataset_id, '2d', '0', '-tr', demo_trainer, '-device', device], env,
               os.path.join(logs, 'train.log'), _EpochPrinter(schedule.epochs, say))

    predictions = os.path.join(workdir, 'predictions')
    n_test = len(os.listdir(os.path.join(folder, 'imagesTs')))
    step(4, f"nnUNetv2_predict on {n_test} test images -> {predictions}")
    run_logged(['nnUNetv2_predict', '-i', os.path.join(folder, 'imagesTs'), '-o', predictions, '-d', dataset_id,
                '-c', '2d', '-f', '0', '-tr', demo_trainer, '-device', device, '-npp', '1', '-nps', '1'], env,
               os.path.join(logs, 'predict.log'))

    step(5, "nnUNetv2_evaluate_folder and overlays")
    model = os.path.join(env['nnUNet_results'], dataset, f'{demo_trainer}__nnUNetPlans__2d')
    run_logged(['nnUNetv2_evaluate_folder', os.path.join(folder, 'labelsTs'), predictions,
                '-djfile', os.path.join(model, 'dataset.json'), '-pfile', os.path.join(model, 'plans.json'),
                '-np', env['nnUNet_def_n_proc']], env, os.path.join(logs, 'evaluate.log'))
    with open(os.path.join(predictions, 'summary.json')) as f:
        summary = json.load(f)
    with open(os.path.join(folder, 'dataset.json')) as f:
        names = {str(v): k for k, v in json.load(f)['labels'].items()}
    dice = {names[label]: metrics['Dice'] for label, metrics in summary['mean'].items()}
    dice['mean'] = summary['foreground_mean']['Dice']
    png = overlay_png(folder, predictions, os.path.join(workdir, 'overlays.png'))
    say(f"test Dice: {', '.join(f'{k} {v:.3f}' for k, v in dice.items())} (mean over {n_test} test images)")
    say(f"done in {time.perf_counter() - start:.0f} s. Overlays: {png}\n  model: {model}\n"
        f"  training curves (nnU-Net's own): {os.path.join(model, 'fold_0', 'progress.png')}\n"
        f"  predictions and summary.json: {predictions}\n  nnU-Net's logs: {logs}")
    return dice
