"""nnU-Net's console scripts run from Python (by the demo, the benchmarks and the tests), each into a log file,
in an environment that ``nnunet_env`` sets up.

Torch-free, like the package's import.
"""
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence


# glibc's malloc, told to keep freed memory for reuse: no memory map of its own for a block below 2 GiB and no
# return of freed memory to the system below 2 GiB. PyTorch's CPU allocator keeps no cache, so under glibc's
# defaults every large tensor of a training step is mapped, and its pages faulted in and zeroed, again at every
# step. Faster CPU steps for a higher resident set (the cost reports with and without: docs/results.md).
# For 2D configurations only: in 3D the heap's fragmentation raised the resident set past the machine's memory
# (README, "On a CPU"). Other C libraries ignore these variables; a user's own values win.
MALLOC_SETTINGS = {'MALLOC_MMAP_THRESHOLD_': str(2 ** 31), 'MALLOC_TRIM_THRESHOLD_': str(2 ** 31)}


def with_malloc_settings(env: Dict[str, str], configuration: str = '2d') -> Dict[str, str]:
    """``env`` with ``MALLOC_SETTINGS`` where it sets no value of its own, for processes that run nnU-Net's
    ``configuration``; unchanged for a 3D configuration."""
    return {**MALLOC_SETTINGS, **env} if configuration == '2d' else dict(env)


def plan_command(dataset_id: str, configuration: str, env: Dict[str, str], *extra: str) -> List[str]:
    """``nnUNetv2_plan_and_preprocess`` for one configuration with ``env``'s ``nnUNet_def_n_proc`` worker
    processes for the fingerprint (``-npfp``; nnU-Net's default is 8 whatever the cores, each worker starting a
    Python of its own) and for preprocessing (``-np``)."""
    workers = env['nnUNet_def_n_proc']
    return ['nnUNetv2_plan_and_preprocess', '-d', str(dataset_id), '-c', configuration, '-np', workers,
            '-npfp', workers, *extra]


class CommandFailed(RuntimeError):
    """A console script exited non-zero or ran past its time limit; the message ends with its output's tail."""


def nnunet_env(root: str, raw: Optional[str] = None, trainer_dir: Optional[str] = None,
               folder_names: Sequence[str] = ('raw', 'preprocessed', 'results'),
               package_settings: bool = True, configuration: str = '2d') -> Dict[str, str]:
    """An environment for nnU-Net's scripts: its three folders under ``root`` (``folder_names``; raw data may
    live elsewhere: ``raw``), 2 worker processes unless the user set others, and for a 2D ``configuration``
    glibc's malloc set to keep freed memory (``MALLOC_SETTINGS``) unless the user set it otherwise.

    Other ``nnUNet_*`` settings of this process (``nnUNet_extTrainer`` too) are dropped, so the scripts find
    this package's trainers the way a user's shell does; ``trainer_dir`` adds a folder of generated trainers.
    This package's own settings (``nnUNet_EMCAD_*``) are kept unless ``package_settings`` is False.
    This interpreter's scripts come first on ``PATH``.
    """
    kept = ('nnUNet_EMCAD',) if package_settings else ()
    env = {k: v for k, v in os.environ.items() if not k.startswith('nnUNet') or k.startswith(kept)}
    folders = [os.path.join(root, name) for name in folder_names]
    env.update(nnUNet_raw=raw or folders[0], nnUNet_preprocessed=folders[1], nnUNet_results=folders[2],
               nnUNet_def_n_proc=os.environ.get('nnUNet_def_n_proc', '2'),
               nnUNet_n_proc_DA=os.environ.get('nnUNet_n_proc_DA', '2'), MPLBACKEND='Agg', PYTHONUNBUFFERED='1')
    if trainer_dir:
        env['nnUNet_extTrainer'] = trainer_dir
    env['PATH'] = os.path.dirname(sys.executable) + os.pathsep + env.get('PATH', '')
    return with_malloc_settings(env, configuration)


def run_logged(args: List[str], env: Dict[str, str], log: str, on_line: Optional[Callable[[str], None]] = None,
               timeout: Optional[float] = None) -> str:
    """Run a console script with its output appended to ``log`` (and each line passed to ``on_line``).

    Returns the output; raises ``CommandFailed`` with its last lines when the script fails or runs longer
    than ``timeout`` seconds (then it runs in a session of its own, which is killed with its workers).
    """
    os.makedirs(os.path.dirname(os.path.abspath(log)), exist_ok=True)
    start = time.perf_counter()
    lines = []
    with open(log, 'a') as f:
        f.write(f"$ {' '.join(args)}\n")
        f.flush()
        proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                stdin=subprocess.DEVNULL, bufsize=1, start_new_session=bool(timeout))
        timer = threading.Timer(timeout, os.killpg, (proc.pid, signal.SIGKILL)) if timeout else None
        if timer:
            timer.start()
        for line in proc.stdout:
            f.write(line)
            lines.append(line)
            if on_line:
                on_line(line)
        code = proc.wait()
        if timer:
            timer.cancel()
        seconds = time.perf_counter() - start
        f.write(f"# {seconds:.1f} s, exit {code}\n")
    if code:
        why = f'ran past {timeout:.0f} s' if timeout and seconds >= timeout else f'failed (exit {code})'
        raise CommandFailed(f"{' '.join(args)} {why}; the end of {log}:\n{''.join(lines[-40:])}")
    return ''.join(lines)
