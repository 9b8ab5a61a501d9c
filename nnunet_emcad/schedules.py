"""Short-schedule subclasses of trainers, written as a module that nnU-Net finds through ``nnUNet_extTrainer``.

The demo and the accuracy benchmark train this way: the stock ``nnUNetv2_train`` runs the generated subclass.
"""
import os
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple


@dataclass
class Schedule:
    """A short training: epochs x iterations, a batch size (None: the plan's), validation iterations per epoch."""

    epochs: int
    iterations: int
    batch_size: Optional[int] = None
    val_iterations: int = 5


PROGRESS_PREFIX = 'nnunet-emcad progress:'


class IterationProgress:
    """Trainer mixin that prints ``PROGRESS_PREFIX epoch E iteration I/N`` after every training iteration.

    nnU-Net logs once per epoch; this line (on the console only, not in nnU-Net's training log) lets a caller
    show progress within an epoch. It counts the calls of nnU-Net's ``train_step`` in its training loop.
    """

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self.iterations_done = 0

    def train_step(self, batch: dict) -> dict:
        result = super().train_step(batch)
        self.iterations_done += 1
        print(f"{PROGRESS_PREFIX} epoch {self.current_epoch} iteration {self.iterations_done}/"
              f"{self.num_iterations_per_epoch}", flush=True)
        return result


def write_trainer_module(path: str, doc: str, trainers: Sequence[Tuple[str, str, str, Schedule]],
                         skip_final_validation: bool = False, progress: bool = False) -> None:
    """Write ``path`` with, for each ``(name, base, module, schedule)``, a subclass ``name`` of ``module.base``.

    ``skip_final_validation`` leaves out the trainer's validation after training (for a caller that runs
    ``nnUNetv2_predict`` and ``nnUNetv2_evaluate_folder`` itself); ``progress`` mixes in ``IterationProgress``.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    lines = [f'"""{doc}"""', 'import torch', '']
    if progress:
        lines += ['from nnunet_emcad.schedules import IterationProgress']
    for name, base, module, schedule in trainers:
        bases = f'IterationProgress, {base}' if progress else base
        lines += [f'from {module} import {base}', '', '', f'class {name}({bases}):',
                  '    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):',
                  '        super().__init__(plans, configuration, fold, dataset_json, device)',
                  f'        self.num_epochs = {schedule.epochs}',
                  f'        self.num_iterations_per_epoch = {schedule.iterations}',
                  f'        self.num_val_iterations_per_epoch = {schedule.val_iterations}']
        if schedule.batch_size is not None:
            lines.append(f'        self.configuration_manager.configuration["batch_size"] = {schedule.batch_size}')
        if skip_final_validation:
            lines += ['', '    def perform_actual_validation(self, save_probabilities: bool = False):',
                      '        self.print_to_log_file("final validation left to nnUNetv2_predict + '
                      'nnUNetv2_evaluate_folder")']
        lines += ['', '']
    with open(path, 'w') as f:
        f.write('\n'.join(lines).rstrip() + '\n')
