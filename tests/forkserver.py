"""Start the suite's Python processes as forks of one that has imported torch already.

The suite starts a few hundred Python processes (torchrun agents, their ranks, CLI runs), and each
spends 2-4 s of CPU importing torch, dynamo and the project before it does anything: on a 2-core
machine that was about a third of CI. A server per pytest worker imports all of it once, never
runs a tensor operation (so it has one thread and forks safely), and forks a child per request.

``python tests/forkserver.py -m MODULE ARGS`` (or ``SCRIPT ARGS``) is the client: a small Python
that imports nothing heavy, hands the server its argv, environment, working folder and standard
streams, and then stands in for the child: its exit status is the child's (a signal death is
re-raised), signals sent to it are forwarded, and if it is SIGKILLed the server kills the child.
So torchrun (which starts ``python -u tests/forkserver.py -m trgl_pipe.run ...`` as each rank)
and the tests see the same exit codes, output and signals as with a plain ``python -m``.

The client runs the plain command instead (``os.execv``) where the server is absent or the
request's environment differs from the server's in anything but the variables a launch sets per
process (rank, world size, ports...): a variable read when torch loads (``ATEN_CPU_CAPABILITY``,
``OMP_NUM_THREADS``, ``ONEDNN_MAX_CPU_ISA``...) has to be seen by a fresh interpreter. Tests that
look at the process tree (a rank's pid among the launcher's children) use plain commands.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import signal
import socket
import struct
import sys
from typing import Any, NoReturn

ADDRESS = "TRGL_TEST_FORKSERVER"  # the environment variable with the server's socket path
# set per process by torchrun and these tests, read by the program when it runs, not at import
PER_PROCESS = {
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_NAME",
    "ROLE_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "PYTHONUNBUFFERED",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING",
    "TORCHELASTIC_ENABLE_FILE_TIMER",
    "TORCHELASTIC_ERROR_FILE",
    "TORCHELASTIC_MAX_RESTARTS",
    "TORCHELASTIC_RESTART_COUNT",
    "TORCHELASTIC_RUN_ID",
    "TORCHELASTIC_USE_AGENT_STORE",
    "TORCHELASTIC_SIGNALS_TO_HANDLE",
    "TORCH_ELASTIC_WORKER_IDENTIFIER",
    "PYTEST_CURRENT_TEST",
    "TRGL_PIPE_LAUNCH",
    ADDRESS,
    "TRGL_TEST_FORKSERVER_VERBOSE",
    "_",  # set by shells
    "OLDPWD",
    "PWD",
    "SHLVL",
}
PRELOAD = (
    "torch",
    "torch._dynamo",
    "torch.distributed.launcher.api",
    "torch.distributed.elastic.multiprocessing",
    "trgl_pipe.run",
    "trgl_pipe.training.single",
    "trgl_pipe.training.rank",
    "trgl_pipe.training.regimes",
    "trgl_pipe.models",
    "trgl_pipe.objectives",
    "trgl_pipe.watch.live",
)


def _differences(server: dict[str, str], request: dict[str, str]) -> list[str]:
    keys = (set(server) | set(request)) - PER_PROCESS
    return sorted(k for k in keys if server.get(k) != request.get(k))


def _send(conn: socket.socket, payload: dict, fds: list[int] | None = None) -> None:
    data = json.dumps(payload).encode()
    frame = [struct.pack("!I", len(data)) + data]
    if fds:
        conn.sendmsg(frame, [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        conn.sendall(frame[0])


def _receive(conn: socket.socket, max_fds: int = 0) -> tuple[dict | None, list[int]]:
    """One message and the descriptors that came with it (None at end of stream)."""
    fds = array.array("i")
    data, ancillary, _, _ = conn.recvmsg(1 << 20, socket.CMSG_LEN(max_fds * fds.itemsize) if max_fds else 0)
    for level, kind, item in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(item[: len(item) - len(item) % fds.itemsize])
    if not data:
        return None, list(fds)
    (size,) = struct.unpack("!I", data[:4])
    body = data[4:]
    while len(body) < size:
        more = conn.recv(size - len(body))
        if not more:
            return None, list(fds)
        body += more
    return json.loads(body), list(fds)


# ---------------------------------------------------------------------------------------------
# client


FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def client(argv: list[str]) -> NoReturn:
    """Run ``argv`` (``-m MODULE ARGS`` or ``SCRIPT ARGS``) as a fork of the server; never returns."""
    options = sys.orig_argv[1 : len(sys.orig_argv) - len(sys.argv)]  # the interpreter's own, as -u
    unbuffered = sys.stdout.write_through
    plain = [sys.executable, *options, *argv]
    path = os.environ.get(ADDRESS)
    if not path:
        os.execv(sys.executable, plain)
    # a signal that comes before the child's pid waits (blocked), then goes to the child
    signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
        request = {
            "argv": argv,
            "env": dict(os.environ),
            "cwd": os.getcwd(),
            "unbuffered": unbuffered,
            "client": os.getpid(),
        }
        _send(conn, request, [0, 1, 2])
        answer, _ = _receive(conn)
    except OSError:
        answer = None
    if answer is None or "pid" not in answer:  # no server, or it refused: a fresh interpreter
        conn.close()
        if os.environ.get("TRGL_TEST_FORKSERVER_VERBOSE"):
            sys.stderr.write(f"forkserver: a fresh interpreter ({answer})\n")
        signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)  # (a pending one then ends us, as it would)
        os.execv(sys.executable, plain)
    pid = answer["pid"]

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    for signum in FORWARDED:
        signal.signal(signum, forward)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
    status, _ = _receive(conn)
    if status is None:  # the server died: say so the way a crash would
        sys.stderr.write("forkserver: the server ended before its child did\n")
        os._exit(1)
    if status["signal"]:  # die of the child's signal, so the launcher sees what it would have
        if status["signal"] not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(status["signal"], signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [status["signal"]])
        os.kill(os.getpid(), status["signal"])
    os._exit(status["code"])


# ---------------------------------------------------------------------------------------------
# server


def _native_threads() -> int:
    return len(os.listdir(f"/proc/{os.getpid()}/task"))


def serve(path: str) -> dict | None:
    """Preload, then fork a child per request; returns the request in a child, None when done."""
    import gc
    import importlib
    import selectors

    server_env = dict(os.environ)
    for name in PRELOAD:
        importlib.import_module(name)
    # what the imports set (a fresh interpreter's imports would set it too), for every child
    imported_env = {k: v for k, v in os.environ.items() if server_env.get(k) != v}
    if _native_threads() != 1:  # a fork would copy a process whose other threads hold locks
        sys.stderr.write(f"forkserver: {_native_threads()} threads after the imports; not serving\n")
        return None
    parent = os.getppid()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path + ".tmp")
    listener.listen(64)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, "accept")
    selector.register(wake_r, selectors.EVENT_READ, "reap")
    children: dict[int, socket.socket | None] = {}  # a child's pid: its client's connection
    clients: dict[int, int] = {}  # a child's pid: its client's
    gc.disable()  # a collection in a child would touch every object, so every page: copy-on-write
    gc.freeze()
    os.rename(path + ".tmp", path)  # ready: clients may connect
    os.makedirs(_forks(path), exist_ok=True)
    while os.getppid() == parent:
        for key, _ in selector.select(timeout=1.0):
            if key.data == "accept":
                conn, _ = listener.accept()
                request, fds = _receive(conn, max_fds=3)
                if request is None or len(fds) != 3:
                    conn.close()
                    for fd in fds:
                        os.close(fd)
                    continue
                differ = _differences(server_env, request["env"])
                if differ:
                    _send(conn, {"refused": differ})
                    conn.close()
                    for fd in fds:
                        os.close(fd)
                    continue
                pid = os.fork()
                if pid == 0:
                    signal.set_wakeup_fd(-1)
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    for other in [conn, listener, *(c for c in children.values() if c is not None)]:
                        other.close()
                    selector.close()
                    os.close(wake_r)
                    os.close(wake_w)
                    for target, fd in enumerate(fds):
                        os.dup2(fd, target)
                    for fd in set(fds):
                        if fd > 2:
                            os.close(fd)
                    request["env"] = {**imported_env, **request["env"]}
                    return request
                for fd in fds:
                    os.close(fd)
                _record(path, request["client"], pid)
                clients[pid] = request["client"]
                _send(conn, {"pid": pid})
                children[pid] = conn
                selector.register(conn, selectors.EVENT_READ, pid)
            elif key.data == "reap":
                while True:
                    try:
                        os.read(wake_r, 4096)
                    except BlockingIOError:
                        break
                _reap(children, clients, selector, path)
            else:  # the client's end closed: it died, so its child goes too
                pid, conn = key.data, key.fileobj
                selector.unregister(conn)
                conn.close()
                children[pid] = None
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        _reap(children, clients, selector, path)
    return None


def _forks(path: str) -> str:
    """The folder where the server notes, per client pid, the pid of its fork (:func:`fork_of`)."""
    return os.path.join(os.path.dirname(path), "forks")


def _record(path: str, client: int, child: int | None) -> None:
    note = os.path.join(_forks(path), str(client))
    if child is None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(note)
        return
    with open(note + ".tmp", "w") as f:
        f.write(str(child))
    os.rename(note + ".tmp", note)


def fork_of(path: str, pid: int) -> int | None:
    """The pid of the fork doing the work of client ``pid`` of the server at ``path`` (None if none)."""
    try:
        with open(os.path.join(_forks(path), str(pid))) as f:
            return int(f.read())
    except (FileNotFoundError, ValueError):
        return None


def _reap(
    children: dict[int, socket.socket | None], clients: dict[int, int], selector: Any, path: str
) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = children.pop(pid, None)
        _record(path, clients.pop(pid, -1), None)
        if conn is None:
            continue
        selector.unregister(conn)
        died = os.WIFSIGNALED(status)
        with contextlib.suppress(OSError):
            _send(
                conn,
                {"signal": os.WTERMSIG(status) if died else 0, "code": os.waitstatus_to_exitcode(status)},
            )
        conn.close()


def run_child(request: dict) -> NoReturn:
    """In the forked child: be ``python [-u] ARGV`` in the request's folder and environment, then
    end as an interpreter ends (non-daemon threads joined, atexit handlers run, output flushed)
    but without tearing down the modules: freeing them would write to every page shared with the
    server (copy-on-write), 1.5 s of a trivial child's 1.6 s."""
    import atexit
    import gc
    import threading
    import traceback

    gc.enable()
    try:
        _run(request)
        code = 0
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            code = stop.code or 0
        else:
            print(stop.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


def _run(request: dict) -> None:
    import io
    import runpy

    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    write_through = request["unbuffered"]
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
    sys.stdout = io.TextIOWrapper(
        io.BufferedWriter(io.FileIO(1, "w", closefd=False)),
        encoding="utf-8",
        line_buffering=os.isatty(1),
        write_through=write_through,
    )
    sys.stderr = io.TextIOWrapper(
        io.BufferedWriter(io.FileIO(2, "w", closefd=False)),
        encoding="utf-8",
        errors="backslashreplace",
        line_buffering=True,
        write_through=write_through,
    )
    argv = request["argv"]
    if argv[0] == "-m":
        sys.path[0] = os.getcwd()
        sys.argv = [argv[1], *argv[2:]]
        sys.modules.pop(argv[1], None)  # run as __main__, as ``python -m`` would, without a warning
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    elif argv[0] == "-c":
        sys.path[0] = ""
        sys.argv = ["-c", *argv[2:]]
        exec(compile(argv[1], "<string>", "exec"), vars(sys.modules["__main__"]))
    else:
        sys.argv = list(argv)
        sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
        runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        task = serve(sys.argv[2])
        if task is None:
            sys.exit(0)
        run_child(task)
    else:
        client(sys.argv[1:])
