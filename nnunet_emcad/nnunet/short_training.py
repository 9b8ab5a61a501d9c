"""Short trainings: a ``Schedule`` value, and ``short_schedule``, which makes the subclass of a trainer that
trains on it.

The package's smoke and five-epoch trainers, the tests' resumable trainer and the trainers that the demo and
the accuracy benchmark generate (``write_trainer_module``: a module that nnU-Net finds through
``nnUNet_extTrainer``, one line per trainer) are all made this way; the accuracy benchmark's also keep the network
at chosen epochs (``Schedule.snapshots``). Torch-free, like the package's import.
"""
import inspect
import os
import shutil
import sys
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple


@dataclass(frozen=True)
class Schedule:
    """A short training: ``epochs``, and where given (None keeps the trainer's own) training and validation
    iterations per epoch, the batch size, a checkpoint every ``save_every`` epochs; ``final_validation=False``
    leaves out the validation after training (for a caller that runs nnUNetv2_predict and
    nnUNetv2_evaluate_folder itself). ``snapshots``: epochs (each a multiple of ``save_every``, before the last)
    after which nnU-Net's latest checkpoint is also kept as ``snapshot_file(iterations so far)``."""

    epochs: int
    iterations: Optional[int] = None
    batch_size: Optional[int] = None
    val_iterations: Optional[int] = None
    save_every: Optional[int] = None
    final_validation: bool = True
    snapshots: Tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for epoch in self.snapshots:
            if not 0 < epoch < self.epochs or not self.save_every or epoch % self.save_every:
                raise ValueError(f"snapshot epoch {epoch}: give epochs before the last ({self.epochs}), each a "
                                 f"multiple of save_every ({self.save_every}), where nnU-Net saves its checkpoint")

    def apply(self, trainer) -> None:
        """Set this schedule on a constructed nnU-Net trainer."""
        trainer.num_epochs = self.epochs
        for attribute, value in (('num_iterations_per_epoch', self.iterations),
                                 ('num_val_iterations_per_epoch', self.val_iterations),
                                 ('save_every', self.save_every)):
            if value is not None:
                setattr(trainer, attribute, value)
        if self.batch_size is not None:
            trainer.configuration_manager.configuration['batch_size'] = self.batch_size


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


def snapshot_file(iterations: int) -> str:
    """The file name a ``Schedule.snapshots`` checkpoint takes after ``iterations`` training iterations."""
    return f'checkpoint_it{iterations}.pth'


class Snapshots:
    """Trainer mixin for ``Schedule.snapshots``: after each of those epochs, a copy of the checkpoint nnU-Net has
    just saved (``checkpoint_latest.pth``) as ``snapshot_file``. Every checkpoint is written to a scratch name and
    then renamed, so a training killed while it saves keeps its previous checkpoint whole (for ``--c``)."""

    def save_checkpoint(self, filename: str) -> None:
        super().save_checkpoint(f'{filename}.partial')
        if os.path.isfile(f'{filename}.partial'):  # nnU-Net saves on the first rank only
            os.replace(f'{filename}.partial', filename)

    def on_epoch_end(self) -> None:
        super().on_epoch_end()
        epochs = self.current_epoch  # nnU-Net counts the finished epoch at the end of on_epoch_end
        if epochs in self.schedule.snapshots and self.local_rank == 0:
            latest = os.path.join(self.output_folder, 'checkpoint_latest.pth')
            snapshot = os.path.join(self.output_folder, snapshot_file(epochs * self.num_iterations_per_epoch))
            shutil.copy(latest, f'{snapshot}.partial')
            os.replace(f'{snapshot}.partial', snapshot)


def _no_final_validation(self, save_probabilities: bool = False) -> None:
    self.print_to_log_file("no final validation on this schedule (Schedule.final_validation is False)")


def short_schedule(base: type, schedule: Schedule, name: str, module: Optional[str] = None,
                   mixins: Sequence[type] = ()) -> type:
    """The subclass ``name`` of the trainer ``base`` (with ``mixins`` in front of it) that trains on ``schedule``.

    Assign it to ``name`` at the top level of ``module`` (default: the caller's module, its ``__module__``),
    where nnU-Net's search for a trainer by name finds it. Its ``__init__`` has nnU-Net's trainer signature
    (nnU-Net saves the argument names in its checkpoints).
    """
    device_default = inspect.signature(base.__init__).parameters['device'].default

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict, device=device_default):
        super(cls, self).__init__(plans, configuration, fold, dataset_json, device)
        schedule.apply(self)

    __init__.__qualname__ = f'{name}.__init__'
    namespace = {'__init__': __init__, '__qualname__': name, 'schedule': schedule,
                 '__module__': module or sys._getframe(1).f_globals.get('__name__', '__main__'),
                 '__doc__': f"``{base.__name__}`` on a short schedule: {schedule}."}
    if not schedule.final_validation:
        namespace['perform_actual_validation'] = _no_final_validation
    mixins = (*mixins, Snapshots) if schedule.snapshots else tuple(mixins)
    cls = type(name, (*mixins, base), namespace)
    return cls


def write_trainer_module(path: str, doc: str, trainers: Sequence[Tuple[str, str, str, Schedule]],
                         progress: bool = False) -> None:
    """Write ``path`` with, for each ``(name, base, module, schedule)``, ``name``: ``module.base`` on ``schedule``
    (printing ``IterationProgress`` lines with ``progress``)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    imports = dict.fromkeys(f'from {module} import {base}' for _, base, module, _ in trainers)
    lines = [f'"""{doc}"""', f'from {__name__} import IterationProgress, Schedule, short_schedule', *imports, '']
    mixins = ', mixins=(IterationProgress,)' if progress else ''
    lines += [f"{name} = short_schedule({base}, {schedule!r}, {name!r}{mixins})"
              for name, base, _, schedule in trainers]
    with open(path, 'w') as f:
        f.write('\n'.join(lines) + '\n')
