"""Console scripts run from Python: output into the log, failures and time-outs raise with the output's tail."""
import os
import platform
import subprocess
import sys
import time

import pytest

from nnunet_emcad.command.scripts import MALLOC_SETTINGS, CommandFailed, nnunet_env, run_logged


def test_output_goes_to_the_log_and_to_the_caller(tmp_path):
    log = str(tmp_path / 'logs' / 'step.log')
    seen = []
    out = run_logged([sys.executable, '-c', 'print("first"); print("second")'], dict(os.environ), log, seen.append)
    assert out == 'first\nsecond\n' and seen == ['first\n', 'second\n']
    text = open(log).read()
    assert text.startswith(f'$ {sys.executable} -c') and 'first\nsecond\n' in text and 'exit 0' in text


def test_a_failing_script_raises_with_its_last_lines(tmp_path):
    script = 'import sys; print("\\n".join(f"line {i}" for i in range(100))); sys.exit(3)'
    with pytest.raises(CommandFailed, match=r'(?s)failed \(exit 3\).*line 99') as info:
        run_logged([sys.executable, '-c', script], dict(os.environ), str(tmp_path / 'x.log'))
    assert 'line 10\n' not in str(info.value)


def test_a_script_past_its_time_limit_is_stopped_with_its_workers(tmp_path):
    """The worker inherits the output pipe, as nnU-Net's data-loader and export workers do."""
    script = ('import subprocess, sys, time; subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]);'
              ' print("started", flush=True); time.sleep(60)')
    start = time.perf_counter()
    with pytest.raises(CommandFailed, match='(?s)ran past 1 s.*started'):
        run_logged([sys.executable, '-c', script], dict(os.environ), str(tmp_path / 'x.log'), timeout=1)
    assert time.perf_counter() - start < 30


def test_environment_keeps_only_the_packages_settings(monkeypatch, tmp_path):
    monkeypatch.setenv('nnUNet_extTrainer', '/elsewhere')
    monkeypatch.setenv('nnUNet_compile', 'f')
    monkeypatch.setenv('nnUNet_EMCAD_PVT_WEIGHTS', '/weights.pth')
    monkeypatch.delenv('nnUNet_n_proc_DA', raising=False)
    env = nnunet_env(str(tmp_path), trainer_dir='/generated', folder_names=('r', 'p', 'o'))
    assert (env['nnUNet_raw'], env['nnUNet_preprocessed'], env['nnUNet_results']) == \
        (str(tmp_path / 'r'), str(tmp_path / 'p'), str(tmp_path / 'o'))
    assert env['nnUNet_extTrainer'] == '/generated' and 'nnUNet_compile' not in env
    assert env['nnUNet_EMCAD_PVT_WEIGHTS'] == '/weights.pth' and env['nnUNet_n_proc_DA'] == '2'
    assert env['PATH'].split(os.pathsep)[0] == os.path.dirname(sys.executable)


def test_environment_sets_glibc_malloc_to_keep_freed_memory_for_2d_unless_the_user_set_it(monkeypatch, tmp_path):
    monkeypatch.delenv('MALLOC_MMAP_THRESHOLD_', raising=False)
    monkeypatch.setenv('MALLOC_TRIM_THRESHOLD_', '0')
    env = nnunet_env(str(tmp_path))
    assert env['MALLOC_MMAP_THRESHOLD_'] == MALLOC_SETTINGS['MALLOC_MMAP_THRESHOLD_'] == str(2 ** 31)
    assert env['MALLOC_TRIM_THRESHOLD_'] == '0'
    env_3d = nnunet_env(str(tmp_path), configuration='3d_fullres')
    assert 'MALLOC_MMAP_THRESHOLD_' not in env_3d and env_3d['MALLOC_TRIM_THRESHOLD_'] == '0'


# Three training steps of a small convolutional network (32 MiB tensors, above the largest block glibc's defaults
# ever keep) after three warm-up steps: prints the page faults of the three.
STEP_FAULTS = """
import resource, torch
torch.set_num_threads(1)
net = torch.nn.Sequential(torch.nn.Conv2d(4, 32, 3, padding=1), torch.nn.InstanceNorm2d(32), torch.nn.ReLU(),
                          torch.nn.Conv2d(32, 4, 1))
x = torch.randn(4, 4, 256, 256)
for step in range(6):
    if step == 3:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    net(x).square().mean().backward()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc', reason="the settings are glibc malloc's")
def test_under_the_malloc_settings_training_steps_reuse_freed_memory_instead_of_faulting_pages_in(tmp_path):
    """What makes CPU training steps faster: under glibc's defaults each step's large tensors are mapped afresh
    and their pages faulted in (one fault per 4 KiB page); under ``MALLOC_SETTINGS`` freed memory is reused. How much
    is reused depends on the machine (none of the three steps' pages faulted here, one 32 MiB tensor per step did on
    the CI machine), so the test asks for a fourth of the faults at most."""
    faults = {}
    for settings in ('defaults', 'tuned'):
        env = {k: v for k, v in os.environ.items() if k not in MALLOC_SETTINGS}
        if settings == 'tuned':
            env = nnunet_env(str(tmp_path))
        proc = subprocess.run([sys.executable, '-c', STEP_FAULTS], env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        faults[settings] = int(proc.stdout.split()[-1])
    assert faults['defaults'] > 100000 and faults['tuned'] * 4 < faults['defaults'], faults
