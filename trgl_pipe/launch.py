"""torchrun for trgl_pipe: a failed run ends with one line naming its cause, and that cause's exit code.

    python -m trgl_pipe.launch [torchrun options] -m trgl_pipe.run CONFIG [section.key=value ...]

``launch/torchrun.sh`` runs this. Plain torchrun ends every failed job with exit status 1 and a
``ChildFailedError`` traceback of 40-60 lines. Here every rank that fails writes its one line and
exit code to torchrun's per-rank error file (``TORCHELASTIC_ERROR_FILE``, the file torchrun's
``@record`` writes for an uncaught exception) instead of printing it; torchrun takes the earliest
of those files as the root cause, and this launcher prints that line last and exits with its code:
2 bad input, 3 a non-finite loss, 1 any other failure, 143 stopped by SIGTERM, 128+N for a rank
killed by signal N. Under plain torchrun the ranks print the line themselves (once: the rank
that failed) and torchrun's summary shows it too.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from typing import Any

LAUNCHED = "TRGL_PIPE_LAUNCH"  # set for the ranks: this launcher prints their failure line


def record_failure(line: str, code: int) -> bool:
    """Write ``line`` as this rank's failure into torchrun's error file.

    Returns True when the launcher will print it (so the rank need not); False otherwise,
    including outside torchrun.
    """
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return False
    data = {
        "message": {
            "message": line,
            "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))},
            "errorCode": code,
        }
    }
    try:
        with open(path, "w") as handle:
            json.dump(data, handle)
    except OSError:
        return False
    return os.environ.get(LAUNCHED) == "1"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def cause_of(rank: int, failure: Any) -> tuple[str | None, int]:
    """The line to print and the exit code for torchrun's root cause: ``failure`` of global ``rank``."""
    line = _recorded_line(failure)
    if line is not None:
        code = failure.error_file_data["message"].get("errorCode") or failure.exitcode
        return line.splitlines()[0], int(code) if int(code) > 0 else 1
    where = f"rank {rank} (pid {failure.pid})"
    if failure.exitcode < 0:
        number = -failure.exitcode
        return f"error: {where} was killed by {_signal_name(number)}", 128 + number
    if failure.exitcode == 143:
        return None, 143  # stopped by SIGTERM, and no rank recorded the line (rank 0 printed it)
    return (
        f"error: {where} exited with status {failure.exitcode}; its output above says why",
        failure.exitcode,
    )


def _recorded_line(failure: Any) -> str | None:
    """The line a rank recorded in its error file (:func:`record_failure`), or None."""
    message = failure.error_file_data.get("message") if isinstance(failure.error_file_data, dict) else None
    if isinstance(message, dict) and isinstance(message.get("message"), str):
        return message["message"]
    return None


def _root_cause(error: Any) -> tuple[int, Any]:
    """A rank killed by a signal other than SIGTERM wrote nothing, and its neighbours only saw the
    connection drop: it is the cause. Unless a rank recorded why it was killed: the neighbours of
    a rank that stopped answering record it as stuck, then SIGKILL it (a stopped or hung process
    ignores torchrun's SIGTERM); their line is the cause. Otherwise the earliest failure."""
    failures = sorted(error.failures.items())
    for rank, failure in failures:
        if failure.exitcode < 0 and -failure.exitcode != signal.SIGTERM:
            explained = [
                (r, f) for r, f in failures if (_recorded_line(f) or "").startswith(f"error: rank {rank} (")
            ]
            return explained[0] if explained else (rank, failure)
    first = error.get_first_failure()
    if _recorded_line(first[1]) is None:  # e.g. a rank stopped by SIGTERM: rank 0 recorded why
        recorded = [(r, f) for r, f in failures if _recorded_line(f) is not None]
        return recorded[0] if recorded else first
    return first


def _probe_endpoint(endpoint: str, timeout_s: float) -> str | None:
    """Why torchrun would wait on ``endpoint`` (None if it answers as a store or nothing listens yet).

    torchrun's store client waits far longer than its read_timeout when something that is not a
    store listens at the endpoint; ask it here, in a thread given ``timeout_s``.
    """
    import threading
    from datetime import timedelta

    from torch.distributed import TCPStore

    host, _, port_text = endpoint.rpartition(":")
    if not host or not port_text.isdigit():
        return None  # torchrun says what is wrong with it
    try:
        with socket.create_connection((host, int(port_text)), timeout=timeout_s):
            pass
    except OSError:
        return None  # nothing there yet: this node may host the store
    answer: list[object] = []

    def connect() -> None:
        try:
            answer.append(
                TCPStore(host, int(port_text), is_master=False, timeout=timedelta(seconds=timeout_s))
            )
        except Exception as error:  # any failure means no store answered
            answer.append(error)

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout_s + 5)
    if answer and not isinstance(answer[0], Exception):
        return None
    return (
        f"error: something listens at the rendezvous endpoint {endpoint} but does not answer as torchrun's "
        f"store within {timeout_s:g} s; check MASTER_ADDR and MASTER_PORT (or --rdzv-endpoint)"
    )


def _read_timeout_s(rdzv_conf: str) -> float:
    for item in (rdzv_conf or "").split(","):
        key, _, value = item.partition("=")
        if key.strip() == "read_timeout" and value.strip().isdigit():
            return float(value)
    return 60.0


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.run import parse_args, run

    os.environ[LAUNCHED] = "1"
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.rdzv_backend == "c10d" and args.rdzv_endpoint and not args.standalone:
        problem = _probe_endpoint(args.rdzv_endpoint, _read_timeout_s(args.rdzv_conf))
        if problem is not None:
            print(problem, file=sys.stderr, flush=True)
            os._exit(1)  # the probe's thread may still be stuck in the store client
    try:
        run(args)
    except ChildFailedError as error:
        line, code = cause_of(*_root_cause(error))
        if line is not None:
            print(line, file=sys.stderr, flush=True)
        return code
    except SignalException as error:  # the launcher itself was told to stop (the ranks were too)
        name = _signal_name(int(error.sigval))
        line = f"stopped: {name}; continue with resume=auto from the last complete checkpoint"
        print(line, file=sys.stderr, flush=True)
        return 128 + int(error.sigval)
    except RendezvousError as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"error: rendezvous at {args.rdzv_endpoint} failed: {reason}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
