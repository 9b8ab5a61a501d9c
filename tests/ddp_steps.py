"""Training steps of EMCAD trainers as nnU-Net's DDP runs them (``nnUNetv2_train ... -num_gpus 2``), on the CPU
over gloo, and the same steps in one process on the whole batch; writes what ``test_ddp.py`` compares.

Each rank builds the trainer as ``run_training``'s ``run_ddp`` does (inside an initialised process group, so
nnU-Net's ``is_ddp`` holds: the DDP wrapper, the gathered Dice and losses) and trains on its half of a global batch
of generated data. nnU-Net's DDP runs on CUDA only; what it takes to run without, and nothing else, is patched
here: the device nnU-Net puts each rank on (``cuda:rank``), its CUDA GradScaler and DDP's ``device_ids``; its
conversion to SyncBatchNorm (CUDA only; the PVT stem's BatchNorm then normalises each rank's half on its own);
for a trainer named ``NAME+compile``, nnU-Net's own torch.compile (off on the CPU) through the ``aot_eager``
backend, and no drop path (a PVT's drop path draws other masks in two ranks than in one process).
For a trainer named ``NAME+nan``, rank 1's second batch of three is NaN, and what each rank stopped with is written
instead, with how many times it gathered the ranks' losses; ``+scaler`` gives the trainer a GradScaler (on the CPU),
as nnU-Net's DDP does on CUDA. Flags combine: ``nnUNetTrainerEMCAD+nan+scaler``. ``NAME@CONFIGURATION`` trains on
that configuration's data set of ``--datasets`` (default: the first), so 2D and 3D trainers share one run.
"""
import argparse
import functools
import json
import os
from typing import Dict, List, Optional
from unittest import mock

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from batchgenerators.utilities.file_and_folder_operations import load_json
from torch._dynamo import OptimizedModule
from torch.nn.parallel import DistributedDataParallel

import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as nnunet_trainer_module
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

from nnunet_emcad.nnunet.trainers.base import unwrap

WORLD = 2
GLOBAL_BATCH = 4
NAN_RANK = 1
NAN_STEPS = 3


def flags(spec: str) -> List[str]:
    """The flags of a trainer spec: ``NAME+compile+nan`` -> ['compile', 'nan']."""
    return spec.split('@')[0].split('+')[1:]


def configuration_of(spec: str, datasets: Dict[str, str]) -> str:
    """The configuration a trainer spec trains: ``NAME@3d_fullres`` -> '3d_fullres'; the first of ``datasets``
    without one."""
    return spec.partition('@')[2] or next(iter(datasets))


def cpu_ddp(module: torch.nn.Module, device_ids: Optional[List[int]] = None) -> DistributedDataParallel:
    """nnU-Net's DDP wrapping (``DDP(network, device_ids=[rank])``) on the CPU, where DDP takes no device ids."""
    return DistributedDataParallel(module)


def make_trainer(spec: str, datasets: Dict[str, str]):
    """The trainer ``spec`` names (``NAME`` with flags and configuration, see above) initialised on the plans of
    its configuration's tiny data set, with the same initial weights in every process. With ``+nan`` each rank's
    Dice is its own, not gathered over the ranks (3D plans' setting), so that the other ranks' losses stay finite."""
    name, configuration = spec.split('@')[0].split('+')[0], configuration_of(spec, datasets)
    dataset = datasets[configuration]
    plans = dict(load_json(os.path.join(dataset, 'nnUNetPlans.json')), continue_training=False)  # as run_training
    plans['configurations'][configuration]['batch_dice'] = 'nan' not in flags(spec)
    dataset_json = load_json(os.path.join(dataset, 'dataset.json'))
    trainer = recursive_find_trainer_class_by_name(name)(plans, configuration, 0, dataset_json,
                                                         device=torch.device('cpu'))
    trainer.device = torch.device('cpu')  # nnU-Net's DDP puts rank r on cuda:r
    trainer.grad_scaler = torch.amp.GradScaler('cpu') if 'scaler' in flags(spec) else None  # and one for CUDA
    if 'compile' in flags(spec):
        trainer._do_i_compile = lambda: True
    torch.manual_seed(0)
    trainer.initialize()
    for module in trainer.network.modules():
        if hasattr(module, 'drop_prob'):
            module.drop_prob = 0.0
    return trainer


def global_batches(trainer, steps: int) -> List[Dict[str, object]]:
    """``steps`` batches of ``GLOBAL_BATCH`` random images and label maps, the targets at the trainer's
    deep-supervision scales (as nnU-Net's data loader gives them)."""
    generator = torch.Generator().manual_seed(1)
    patch = list(trainer.configuration_manager.patch_size)
    classes = trainer.label_manager.num_segmentation_heads
    scales = trainer._get_deep_supervision_scales()
    batches = []
    for _ in range(steps):
        data = torch.randn(GLOBAL_BATCH, 1, *patch, generator=generator)
        target = torch.randint(0, classes, (GLOBAL_BATCH, 1, *patch), generator=generator).float()
        targets = [F.interpolate(target, size=[round(p * s) for p, s in zip(patch, scale)], mode='nearest')
                   for scale in scales]
        batches.append({'data': data, 'target': targets})
    return batches


def part(batch: dict, rank: int) -> dict:
    """Rank ``rank``'s share of a global batch (nnU-Net gives every rank global batch / world size)."""
    share = slice(rank * GLOBAL_BATCH // WORLD, (rank + 1) * GLOBAL_BATCH // WORLD)
    return {'data': batch['data'][share], 'target': [t[share] for t in batch['target']]}


def train(trainer, batches: List[dict]) -> dict:
    """nnU-Net's training steps on ``batches``, then its end of epoch (under DDP: the losses gathered from every
    rank); the logged loss, the final weights and the parameters left without a gradient."""
    outputs = [trainer.train_step(batch) for batch in batches]
    trainer.on_train_epoch_end(outputs)
    network = unwrap(trainer.network)
    inner = trainer.network.module if isinstance(trainer.network, DistributedDataParallel) else trainer.network
    return {'logged_loss': float(trainer.logger.get_value('train_losses', trainer.current_epoch)),
            'compiled': isinstance(inner, OptimizedModule),
            'no_gradient': [n for n, p in network.named_parameters() if p.grad is None],
            'weights': {k: v.detach().clone() for k, v in network.state_dict().items()}}


def patch_for_the_cpu() -> None:
    """What nnU-Net's DDP needs to run on the CPU (DDP without device ids, no SyncBatchNorm), and its compile
    through ``aot_eager`` (inductor's CPU compile would take minutes)."""
    nnunet_trainer_module.DDP = cpu_ddp
    torch.nn.SyncBatchNorm.convert_sync_batchnorm = staticmethod(lambda module, process_group=None: module)
    torch.compile = functools.partial(torch.compile, backend='aot_eager')


def rank_worker(rank: int, trainers: List[str], datasets: Dict[str, str], steps: int, out: str) -> None:
    """Train each of ``trainers`` as rank ``rank``; for a ``+nan`` one, what the rank stopped with is written, with
    the number of its all_gather calls and where its part of the training log starts."""
    dist.init_process_group('gloo', init_method=f"file://{os.path.join(out, 'process_group')}", rank=rank,
                            world_size=WORLD)
    patch_for_the_cpu()
    gathers = mock.patch.object(dist, 'all_gather', wraps=dist.all_gather).start()
    try:
        for name in trainers:
            gathers.reset_mock()
            trainer = make_trainer(name, datasets)
            assert trainer.is_ddp and isinstance(trainer.network, DistributedDataParallel)
            diverging = 'nan' in flags(name)
            batches = [part(b, rank) for b in global_batches(trainer, NAN_STEPS if diverging else steps)]
            if not diverging:
                torch.save(train(trainer, batches), os.path.join(out, f'{name}_rank{rank}.pt'))
                continue
            if rank == NAN_RANK:
                batches[1]['data'].fill_(float('nan'))
            # trainers started in the same second share nnU-Net's log file (its name has the start time)
            log_start = os.path.getsize(trainer.log_file) if os.path.isfile(trainer.log_file) else 0
            try:
                train(trainer, batches)
                stopped = None
            except RuntimeError as e:
                stopped = str(e)
            with open(os.path.join(out, f'{name}_rank{rank}_stop.json'), 'w') as f:
                json.dump({'stopped': stopped, 'log_file': trainer.log_file, 'log_start': log_start,
                           'gathers': gathers.call_count}, f)
    finally:
        dist.destroy_process_group()


def stopped(name: str, out: str) -> dict:
    """What every rank stopped with for the ``+nan`` trainer ``name``, and its part of rank 0's training log."""
    ranks = [load_json(os.path.join(out, f'{name}_rank{r}_stop.json')) for r in range(WORLD)]
    with open(ranks[0]['log_file']) as f:
        f.seek(ranks[0]['log_start'])
        return {'stopped': [r['stopped'] for r in ranks], 'gathers': [r['gathers'] for r in ranks], 'log': f.read()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('out', help='folder for the results (summary.json)')
    parser.add_argument('--datasets', nargs='+', required=True, metavar='CONFIGURATION=FOLDER',
                        help="each configuration's planned tiny data set (its preprocessed folder)")
    parser.add_argument('--trainers', nargs='+', required=True, help='NAME[+FLAG...][@CONFIGURATION]')
    parser.add_argument('--steps', type=int, default=2, help=f'training steps (a +nan trainer takes {NAN_STEPS})')
    args = parser.parse_args()
    datasets = dict(pair.split('=', 1) for pair in args.datasets)
    mp.spawn(rank_worker, args=(args.trainers, datasets, args.steps, args.out), nprocs=WORLD, join=True)
    patch_for_the_cpu()
    summary = {}
    for name in args.trainers:
        if 'nan' in flags(name):
            summary[name] = stopped(name, args.out)
            continue
        trainer = make_trainer(name, datasets)
        parameters = {k for k, _ in unwrap(trainer.network).named_parameters()}
        initial = {k: v.detach().clone() for k, v in unwrap(trainer.network).state_dict().items()}
        single = train(trainer, global_batches(trainer, args.steps))
        ranks = [torch.load(os.path.join(args.out, f'{name}_rank{r}.pt')) for r in range(WORLD)]
        summary[name] = {
            'compiled': [r['compiled'] for r in ranks] + [single['compiled']],
            'deepest_head': f'decoder.seg_layers.{len(unwrap(trainer.network).decoder.seg_layers) - 1}',
            'single_loss': single['logged_loss'], 'ddp_losses': [r['logged_loss'] for r in ranks],
            'single_no_gradient': single['no_gradient'], 'ddp_no_gradient': [r['no_gradient'] for r in ranks],
            'max_weight_difference': max(float((ranks[0]['weights'][k].float() - v.float()).abs().max())
                                         for k, v in single['weights'].items()),
            # parameters (a PVT stem's BatchNorm statistics differ between ranks until DDP's next broadcast)
            'max_rank_difference': max(float((ranks[1]['weights'][k].float() - v.float()).abs().max())
                                       for k, v in ranks[0]['weights'].items() if k in parameters),
            'max_weight_change': max(float((initial[k] - single['weights'][k]).abs().max()) for k in parameters)}
    with open(os.path.join(args.out, 'summary.json'), 'w') as f:
        json.dump(summary, f, indent=1)


if __name__ == '__main__':
    main()
