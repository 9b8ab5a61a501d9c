"""Python commands (console scripts, ``python SCRIPT.py``) started warm: forked from a server process that has
imported their heavy third-party modules (torch, timm, SciPy, scikit-image, ...) once, instead of each command
importing them again (benchmarks/results/test_durations.md, "Commands started warm").

Each command still runs in a process of its own as a shell starts it: its environment, arguments, working
directory, standard streams and a session of its own; the script file itself runs as ``__main__``; nnU-Net and
this package are imported afresh (they read their settings when imported) after the start-up hook of this
package's ``.pth`` file has run again; the process exits as Python exits (non-daemon threads joined, ``atexit``
handlers run). A command whose environment differs from a server's in more than ``nnUNet_*`` settings and
``PATH`` (glibc's malloc, OpenMP and Python read theirs when a process starts) gets a server of its own; one that
is not a Python script of this interpreter, or any command under ``NNUNET_EMCAD_TESTS_COLD=1``, starts cold.
"""
import atexit
import importlib
import json
import os
import runpy
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional, Tuple

from nnunet_emcad._startup import register_trainer_dir

PRELOAD = ('torch', 'torch._dynamo', 'timm', 'numpy', 'scipy.ndimage', 'scipy.stats', 'skimage.morphology',
           'skimage.transform', 'sklearn', 'matplotlib.pyplot', 'seaborn', 'pandas', 'SimpleITK', 'nibabel', 'blosc2',
           'imageio', 'tifffile', 'batchgenerators', 'batchgeneratorsv2', 'dynamic_network_architectures',
           'acvl_utils', 'httpx', 'rich')
"""What nnU-Net's commands import that takes time and reads no ``nnUNet_*`` setting (nnU-Net and this package
are left out: the commands import them)."""

_PER_COMMAND = ('nnUNet', 'PYTEST_', 'PATH')  # read after start-up (pytest's own change from test to test)


# ---- the server (this file run as a script) and each command's process ---------------------------------------

def _exit_code(code) -> int:
    """What Python's ``sys.exit(code)`` makes of ``code``, printing a message as it does."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _command(request: dict) -> None:
    """In the forked process: become the command of ``request`` and exit as Python would."""
    code = 1
    try:
        os.setsid()
        for fd, path in ((1, request['stdout']), (2, request['stderr'])):
            output = os.open(path, os.O_WRONLY | os.O_APPEND)
            os.dup2(output, fd)
            os.close(output)
        os.chdir(request['cwd'])
        os.environ.clear()
        os.environ.update(request['env'])
        register_trainer_dir()  # what the .pth file does at every interpreter's start
        if 'numpy' in sys.modules:
            sys.modules['numpy'].random.seed()  # fresh entropy, as a new process's numpy has
        sys.argv = list(request['argv'])
        sys.path[0] = os.path.dirname(os.path.realpath(sys.argv[0]))  # the script's folder, as Python puts it first
        try:
            runpy.run_path(sys.argv[0], run_name='__main__')
            code = 0
        except SystemExit as e:
            code = _exit_code(e.code)
        except BaseException as e:
            trace = e.__traceback__
            while trace and trace.tb_frame.f_code.co_filename != sys.argv[0]:
                trace = trace.tb_next  # from the script's frame on, as Python prints it
            sys.excepthook(type(e), e.with_traceback(trace or e.__traceback__), trace or e.__traceback__)
            code = 1
        threading._shutdown()  # as Python's exit: threading's exit hooks (which wake idle pools' workers), then joins
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


def serve() -> None:
    """Import ``PRELOAD``, then for each request line on stdin fork its command; answer its pid, then its exit
    code (negative: the signal that ended it)."""
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    requests, answers = os.fdopen(os.dup(0), 'r'), os.fdopen(os.dup(1), 'w', buffering=1)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):
        os.dup2(devnull, fd)  # the commands' standard streams are never the server's pipes
    for line in requests:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            os.close(requests.fileno())
            os.close(answers.fileno())
            _command(json.loads(line))
        answers.write(f'{pid}\n')
        answers.write(f'{os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])}\n')


# ---- the tests' side ------------------------------------------------------------------------------------------

class _Server:
    def __init__(self, env: Dict[str, str]):
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__)], env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=os.path.dirname(
                                         os.path.abspath(__file__)))
        self.lock = threading.Lock()
        self.pending = b''

    def _answer(self, deadline: Optional[float]) -> int:
        while b'\n' not in self.pending:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self.proc.stdout], [], [], wait)[0]:
                raise TimeoutError
            chunk = os.read(self.proc.stdout.fileno(), 4096)
            if not chunk:
                raise RuntimeError('the warm command server ended')
            self.pending += chunk
        line, self.pending = self.pending.split(b'\n', 1)
        return int(line)

    def run(self, request: dict, timeout: float) -> int:
        with self.lock:
            self.proc.stdin.write(json.dumps(request).encode() + b'\n')
            self.proc.stdin.flush()
            pid = self._answer(None)
            try:
                return self._answer(time.monotonic() + timeout)
            except TimeoutError:
                os.killpg(pid, signal.SIGKILL)
                self._answer(None)
                raise subprocess.TimeoutExpired(request['argv'], timeout)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


_SERVERS: Dict[Tuple, _Server] = {}


@atexit.register
def _close_servers() -> None:
    for server in _SERVERS.values():
        server.close()


def _is_this_python(path: Optional[str]) -> bool:
    """The program at ``path`` is this interpreter: the same file in the same folder (``python``, ``python3`` of one
    virtual environment; not the interpreter the environment was made from)."""
    return bool(path) and os.path.dirname(os.path.abspath(path)) == os.path.dirname(os.path.abspath(sys.executable)) \
        and os.path.samefile(path, sys.executable)


def warm_argv(args: List[str], env: Dict[str, str], cwd: str) -> Optional[List[str]]:
    """What a warm command's ``sys.argv`` is: a console script of this interpreter (found on ``env``'s PATH) with
    its arguments, or ``python SCRIPT.py ...``'s script with its arguments; None for any other command."""
    path = shutil.which(args[0], path=env.get('PATH'))
    if not path:
        return None
    if _is_this_python(path):
        script = len(args) > 1 and args[1].endswith('.py') and os.path.isfile(os.path.join(cwd, args[1]))
        return list(args[1:]) if script else None
    with open(path, 'rb') as f:
        first = f.readline().decode(errors='replace')
    shebang = first[2:].strip() if first.startswith('#!') else ''
    return [path] + list(args[1:]) if shebang and _is_this_python(shutil.which(shebang, path=env.get('PATH'))) \
        else None


def run(args: List[str], env: Optional[Dict[str, str]] = None, cwd: Optional[str] = None, timeout: float = 600,
        stderr: int = subprocess.STDOUT) -> subprocess.CompletedProcess:
    """``subprocess.run(args, env=env, cwd=cwd, stdout=PIPE, stderr=stderr, text=True, stdin=DEVNULL)``, with a
    Python command started warm; ``stderr``: ``subprocess.STDOUT`` (with stdout, in order) or ``subprocess.PIPE``."""
    env, cwd = dict(os.environ if env is None else env), os.path.abspath(cwd or os.getcwd())
    argv = None if os.environ.get('NNUNET_EMCAD_TESTS_COLD') == '1' else warm_argv(args, env, cwd)
    if argv is None:
        return subprocess.run(args, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=stderr, text=True,
                              stdin=subprocess.DEVNULL, timeout=timeout)
    startup = tuple(sorted((k, v) for k, v in env.items() if not k.startswith(_PER_COMMAND)))
    if startup not in _SERVERS:
        _SERVERS[startup] = _Server(dict(startup))
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, 'stdout')
        err = out if stderr == subprocess.STDOUT else os.path.join(folder, 'stderr')
        for path in {out, err}:
            open(path, 'w').close()
        request = {'argv': argv, 'env': env, 'cwd': cwd, 'stdout': out, 'stderr': err}
        code = _SERVERS[startup].run(request, timeout)
        texts = [open(path, encoding='utf-8', errors='replace').read() for path in (out, err)]
    return subprocess.CompletedProcess(args, code, texts[0], None if err == out else texts[1])


if __name__ == '__main__':
    serve()
