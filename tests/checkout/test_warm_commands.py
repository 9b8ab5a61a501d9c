"""A console script started warm (tests/warm_commands.py) prints and exits as it does started cold, with its own
environment, working directory, arguments and streams, and is killed with its workers past its time limit."""
import json
import os
import re
import subprocess
import sys
import time

import pytest

import warm_commands
from nnunet_emcad._startup import TRAINER_DIR
from nnunet_emcad.command.scripts import nnunet_env

PROBE = f"""#!{sys.executable}
import json, os, sys
if sys.argv[1] == 'fail':
    raise ValueError('probe failed')
if sys.argv[1] == 'sleep':
    import subprocess, time
    worker = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
    with open('worker.pid', 'w') as f:
        f.write(str(worker.pid))
    time.sleep(60)
if sys.argv[1] == 'pool':  # kept open to the end (inductor caches its pool): Python's exit wakes its workers
    import concurrent.futures
    concurrent.futures.kept = concurrent.futures.ThreadPoolExecutor(2)
    print('pooled', concurrent.futures.kept.submit(lambda: 2 + 2).result())
print(json.dumps({{'name': __name__, 'argv': sys.argv[1:], 'cwd': os.getcwd(), 'raw': os.environ.get('nnUNet_raw'),
                  'trainers': os.environ.get('nnUNet_extTrainer'), 'path0': sys.path[0]}}))
print('to stderr', file=sys.stderr)
code = sys.argv[2] if len(sys.argv) > 2 else None
sys.exit(int(code) if code and code.isdigit() else code)
"""


@pytest.fixture
def probe(tmp_path):
    """A console script of this interpreter (a shebang line, executable, on PATH) and an environment with it."""
    folder = tmp_path / 'bin'
    folder.mkdir()
    (folder / 'probe').write_text(PROBE)
    (folder / 'probe').chmod(0o755)
    (folder / 'probe.py').write_text(PROBE)  # for python bin/probe.py
    env = nnunet_env(str(tmp_path / 'nnunet'), package_settings=False)
    return dict(env, PATH=f"{folder}{os.pathsep}{env['PATH']}"), tmp_path


def _without_import_warnings(text: str) -> str:
    """``text`` less the warnings modules print when imported (the warm server imported them once, silently)."""
    return re.sub(r'^\S+\.py:\d+: \w*Warning: .*\n  warnings\.warn\(\n', '', text, flags=re.M)


def test_an_nnunet_command_started_warm_prints_and_exits_as_it_does_started_cold(tmp_path, monkeypatch):
    env = nnunet_env(str(tmp_path), package_settings=False)
    for script in ('nnUNetv2_plan_and_preprocess', 'nnUNetv2_train', 'nnUNetv2_predict', 'nnunet-emcad'):
        assert warm_commands.warm_argv([script], env, str(tmp_path)), f'{script} would start cold'
    args = ['nnUNetv2_train', '999', '2d', '0', '-tr', 'nnUNetTrainerEMCAD', '-device', 'cpu']
    warm = warm_commands.run(args, env)
    monkeypatch.setenv('NNUNET_EMCAD_TESTS_COLD', '1')
    cold = warm_commands.run(args, env)
    assert warm.returncode == cold.returncode == 1
    assert 'Traceback (most recent call last)' in warm.stdout and 'warm_commands' not in warm.stdout
    assert _without_import_warnings(warm.stdout) == _without_import_warnings(cold.stdout)


def test_each_warm_command_has_its_own_arguments_environment_working_directory_and_streams(probe):
    env, tmp = probe
    runs = []
    commands = {'one': ['probe', 'one'], 'two': [sys.executable, os.path.join('..', 'bin', 'probe.py'), 'two']}
    for name, command in commands.items():
        (tmp / name).mkdir()
        proc = warm_commands.run(command, dict(env, nnUNet_raw=str(tmp / name)), cwd=str(tmp / name),
                                 stderr=subprocess.PIPE)
        assert proc.returncode == 0 and proc.stderr == 'to stderr\n', proc
        runs.append(json.loads(proc.stdout))
    for name, seen in zip(commands, runs, strict=True):
        assert seen['name'] == '__main__' and seen['argv'] == [name]
        assert seen['path0'] == os.path.realpath(tmp / 'bin')  # the script's folder, first on sys.path
        assert seen['cwd'] == seen['raw'] == str(tmp / name)
        assert seen['trainers'] == TRAINER_DIR  # the package's start-up hook ran in the command's environment


def test_a_warm_command_exits_with_its_code_message_or_traceback_as_python_does(probe):
    env, _ = probe
    assert warm_commands.run(['probe', 'exit', '3'], env).returncode == 3
    message = warm_commands.run(['probe', 'exit', 'stopped here'], env)
    assert message.returncode == 1 and message.stdout.endswith('to stderr\nstopped here\n')
    failed = warm_commands.run(['probe', 'fail'], env)
    assert failed.returncode == 1
    assert re.search(r'\ATraceback \(most recent call last\):\n  File "[^"]+/probe", line 4, in <module>\n',
                     failed.stdout), failed.stdout
    assert failed.stdout.endswith('ValueError: probe failed\n')


def test_a_warm_command_with_a_thread_pool_left_open_exits_as_python_does(probe):
    # inductor leaves its compile threads' pool open in nnU-Net's compiled prediction: a command started warm that
    # joined the pool's threads without waking them first hung there, its work done
    env, _ = probe
    proc = warm_commands.run(['probe', 'pool'], env, timeout=30)
    assert proc.returncode == 0 and proc.stdout.startswith('pooled 4\n'), proc.stdout


def test_a_warm_command_past_its_time_limit_is_killed_with_its_workers(probe):
    env, tmp = probe
    start = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        warm_commands.run(['probe', 'sleep'], env, cwd=str(tmp), timeout=3)
    assert time.monotonic() - start < 30
    status = f"/proc/{(tmp / 'worker.pid').read_text()}/status"
    for _ in range(50):  # gone, or a zombie its new parent has not reaped yet
        if not os.path.exists(status) or re.search(r'^State:\s+Z', open(status).read(), re.M):
            break
        time.sleep(0.1)
    else:
        raise AssertionError('the command was killed, its worker still runs')
