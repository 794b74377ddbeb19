"""Run a lab check where the learner's notebook cannot reach it.

A check involves three processes:

1. the **notebook** calls ``labNN.check_x(fn)``: :func:`run_check` sends ``fn`` (with what it
   references from earlier cells, by value, with ``cloudpickle``) to a judge, prints what comes
   back, and raises :class:`~vramlab.checks.CheckFailed` on a failed verdict;
2. the **judge**, a process that has run nothing of the notebook's (on Linux a fork of a zygote
   that only imported torch and the checks, :func:`zygote_main`; elsewhere a fresh interpreter),
   so a monkeypatch in the notebook does not reach it; it draws the hidden configurations,
   computes the references and gives the verdict, and never loads the learner's code;
3. the **sandbox**, a process the judge starts and owns (a fork of the judge made before the judge
   does anything, or a fresh interpreter), loads the learner's code in
   strict mode (:mod:`vramlab.checks.strict`) and runs it on request (:meth:`Learner.call`), under
   the check's measurement; it answers with plain data (numbers, strings, tensors) that the judge
   reads with ``torch.load(weights_only=True)``, so nothing the learner's code returns runs in the
   judge.

Threads, pools and patches left in the notebook by earlier cells are not in either process; a
thread or process started by the learner's code, ``on_host()`` or a popped dispatch mode in the
sandbox is reported as tampering. What the learner's code prints reaches the notebook.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import traceback
from collections.abc import Callable
from typing import IO, Any

from . import FAILED, CheckResult, give_verdict

_MAX_TEXT = 16_000  # characters of a learner's traceback sent back to the notebook


class LearnerError(RuntimeError):
    """The learner's code raised while a check ran it; the message is its traceback."""


class Tampering(Exception):
    """The sandbox saw the learner's code switch the measuring off."""

    def __init__(self, notes: list[str]) -> None:
        super().__init__("; ".join(notes))
        self.notes = notes


class _Raised(Exception):
    """The learner's code raised in the sandbox (carries the formatted traceback)."""


class _Ended(Exception):
    """The sandbox process ended before it answered."""


def _send(stream: IO[bytes], data: bytes) -> None:
    stream.write(struct.pack("<Q", len(data)) + data)
    stream.flush()


def _receive(stream: IO[bytes]) -> bytes | None:
    head = stream.read(8)
    if len(head) < 8:
        return None
    (size,) = struct.unpack("<Q", head)
    data = stream.read(size)
    return data if len(data) == size else None


def _resolve(target: str) -> Callable[..., Any]:
    module, _, name = target.partition(":")
    if module != "vramlab.checks" and not module.startswith("vramlab.checks."):
        raise ValueError(f"not a check target: {target!r}")
    return getattr(importlib.import_module(module), name)  # type: ignore[no-any-return]


def _env() -> dict[str, str]:
    """The notebook's import path (its own modules stay importable) and one OpenMP thread."""
    path = [os.getcwd() if p == "" else p for p in sys.path]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path), "OMP_NUM_THREADS": "1"}


def _command(main: str, fd: int) -> list[str]:
    return [sys.executable, "-c", f"from vramlab.checks.isolation import {main}; {main}()", str(fd)]


# -- the notebook's side -------------------------------------------------------------------


def _pickled(fns: tuple[Callable[..., Any], ...]) -> bytes:
    """The learner's functions, by value where they come from a notebook or a module the
    sandbox might not import the same way (anything outside vramlab and installed packages)."""
    import cloudpickle

    registered = []
    for fn in fns:
        module = sys.modules.get(getattr(fn, "__module__", None) or "")
        file = str(getattr(module, "__file__", "") or "")
        local = module is not None and module.__name__ != "__main__" and "-packages" not in file
        if local and not module.__name__.startswith("vramlab") and module not in registered:
            cloudpickle.register_pickle_by_value(module)
            registered.append(module)
    try:
        return cloudpickle.dumps(fns)  # type: ignore[no-any-return]
    finally:
        for module in registered:
            cloudpickle.unregister_pickle_by_value(module)


def _request(target: str, blob: bytes, data: tuple) -> bytes:
    env = {k: v for k, v in os.environ.items() if k.startswith("VRAMLAB_")}  # as set now, for the judge
    return pickle.dumps((target, blob, data, env))


_ZYGOTE: list[tuple[subprocess.Popen, socket.socket]] = []
PRELOAD = ("torch", "transformers", "vramlab.checks.lab01", "vramlab.checks.lab02", "vramlab.checks.lab03")
PRELOAD += ("vramlab.checks.lab04", "vramlab.checks.lab05", "vramlab.checks.strict", "cloudpickle")


def _forks() -> bool:
    """Whether checks fork their judges from a zygote (Linux); elsewhere each starts a fresh interpreter."""
    return sys.platform == "linux"


def _zygote() -> socket.socket:
    """The control socket of this notebook's zygote: a fresh interpreter, started at the first check,
    that has imported torch and the checks and forks a judge per check (milliseconds instead of
    seconds). It never runs the notebook's code or the learner's, so its forks are clean."""
    if _ZYGOTE and _ZYGOTE[0][0].poll() is None:
        return _ZYGOTE[0][1]
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    proc = subprocess.Popen(
        _command("zygote_main", theirs.fileno()), pass_fds=(theirs.fileno(),), env=_env(), stdin=subprocess.DEVNULL
    )
    theirs.close()
    _ZYGOTE[:] = [(proc, ours)]
    return ours


def _start_judge(request: bytes, output: int, verdict: int) -> None:
    """Start a judge for ``request`` that writes what it prints to fd ``output`` and, on fd
    ``verdict``, its process group id and then its verdict."""
    if _forks():
        request_read, request_write = os.pipe()
        socket.send_fds(_zygote(), [b"j"], [request_read, output, verdict])
        os.close(request_read)
        with os.fdopen(request_write, "wb") as stream:
            stream.write(request)
        return
    proc = subprocess.Popen(
        _command("judge_main", verdict),
        stdin=subprocess.PIPE,
        stdout=output,
        stderr=output,
        pass_fds=(verdict,),
        env=_env(),
    )
    assert proc.stdin is not None
    proc.stdin.write(request)
    proc.stdin.close()


def run_check(name: str, target: str, *fns: Callable[..., Any], data: tuple = ()) -> CheckResult:
    """Judge the learner's ``fns`` with ``target`` (``"vramlab.checks.labNN:_check_x"``, called
    in a judge process as ``target(learner, *data)``; ``data``: plain values, such as source
    text) and show the verdict in this process (what the learner's code printed first)."""
    try:
        blob = _pickled(fns)
    except Exception as err:  # noqa: BLE001 - any pickling failure is the same advice
        return give_verdict(
            name,
            FAILED,
            f"the check runs your code in a fresh process, and could not send it there ({type(err).__name__}: "
            f"{err}). Hint: your function may use names defined in earlier cells (functions, classes, numbers, "
            "imported modules), but not a running thread, pool, open file or lock.",
        )
    output_read, output_write = os.pipe()
    verdict_read, verdict_write = os.pipe()
    try:
        _start_judge(_request(target, blob, data), output_write, verdict_write)
    finally:
        os.close(output_write)
        os.close(verdict_write)
    with os.fdopen(output_read, "rb") as printed, os.fdopen(verdict_read, "rb") as verdicts:
        group = _receive(verdicts)
        try:
            for line in iter(printed.readline, b""):  # shown as it comes: a long check is not silent
                print(line.decode(errors="replace"), end="", flush=True)
            answer = _receive(verdicts)
        except BaseException:  # an interrupted cell stops the judge, its sandbox and its ranks
            if group:
                with contextlib.suppress(OSError):
                    os.killpg(int(group), signal.SIGKILL)
            raise
    if answer is None:
        raise RuntimeError("the check's judge process ended without a verdict")
    verdict = json.loads(answer)
    if "raised" in verdict:
        raise LearnerError("your code raised while the check ran it:\n" + verdict["raised"])
    if "error" in verdict:
        raise RuntimeError("the check itself failed (please report this):\n" + verdict["error"])
    return give_verdict(verdict["name"] or name, verdict["status"], verdict["message"])


# -- the judge's side ------------------------------------------------------------------------


class Learner:
    """The judge's handle on the learner's code, which lives in the sandbox process."""

    def __init__(self, requests: IO[bytes], answers: IO[bytes], wait: Callable[[], int]) -> None:
        self._requests, self._answers, self._wait = requests, answers, wait

    def call(self, target: str, *args: Any) -> Any:
        """Run ``target(fns, *args)`` in the sandbox (``fns``: the learner's functions) and
        return its value; raise NotImplementedError for a stub, :class:`Tampering` if the
        measuring was switched off, and pass on an exception of the learner's code."""
        import torch

        try:
            _send(self._requests, pickle.dumps((target, args)))
        except BrokenPipeError:
            raise _Ended() from None
        data = _receive(self._answers)
        if data is None:
            raise _Ended()
        reply = torch.load(io.BytesIO(data), weights_only=True)
        if reply["tampering"]:
            raise Tampering(reply["tampering"])
        if reply.get("not_attempted"):
            raise NotImplementedError
        if "raised" in reply:
            raise _Raised(reply["raised"])
        return reply["value"]

    def exit_code(self) -> int:
        """How the sandbox ended (after :class:`_Ended`)."""
        return self._wait()


def _verdict(target: str, learner: Learner, data: tuple) -> dict[str, Any]:
    from . import quiet

    with quiet():
        try:
            result = _resolve(target)(learner, *data)
        except Tampering as err:
            return {
                "name": "",
                "status": FAILED,
                "message": "the check's measurement was switched off while your code ran: "
                f"{err}. This is reported as tampering; let the check measure your code as it is.",
            }
        except _Raised as err:
            return {"raised": str(err)}
        except _Ended:
            return {
                "name": "",
                "status": FAILED,
                "message": f"the process that ran your code ended (exit code {learner.exit_code()}) before your "
                "function returned",
            }
    return {"name": result.name, "status": result.status, "message": result.message}


def _sandbox(forked: bool) -> tuple[IO[bytes], IO[bytes], Callable[[], int]]:
    """Start the sandbox: a fork of this judge before it has run anything (in a zygote's judge),
    or a fresh interpreter. Returns (requests, answers, wait-for-exit-code)."""
    request_read, request_write = os.pipe()
    answer_read, answer_write = os.pipe()
    if forked:
        pid = os.fork()
        if pid == 0:  # the sandbox
            os.close(request_write)
            os.close(answer_read)
            code = 0
            try:
                _serve(os.fdopen(request_read, "rb"), os.fdopen(answer_write, "wb"))
            except BaseException:  # noqa: BLE001 - the exit code says it
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)

        codes: list[int] = []

        def wait() -> int:
            if not codes:
                codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
            return codes[0]

    else:
        proc = subprocess.Popen(
            _command("sandbox_main", answer_write), stdin=request_read, pass_fds=(answer_write,), env=_env()
        )
        wait = proc.wait
    os.close(request_read)
    os.close(answer_write)
    return os.fdopen(request_write, "wb"), os.fdopen(answer_read, "rb"), wait


def _judge(request: bytes, verdict_out: IO[bytes], forked: bool) -> None:
    """A judge: start the sandbox, hand it the learner's code, run the check, send the verdict."""
    os.setpgid(0, 0)  # a process group of its own, which the notebook can stop
    _send(verdict_out, str(os.getpgid(0)).encode())
    target, blob, data, env = pickle.loads(request)
    for name in [k for k in os.environ if k.startswith("VRAMLAB_")]:  # the notebook's, as of this check
        del os.environ[name]
    os.environ.update(env)
    requests, answers, wait = _sandbox(forked)
    try:
        import torch

        torch.set_num_threads(1)
        _send(requests, blob)
        try:
            verdict = _verdict(target, Learner(requests, answers, wait), data)
        except Exception:  # noqa: BLE001 - a bug of the check, reported as one
            verdict = {"error": traceback.format_exc()[-_MAX_TEXT:]}
    finally:
        with contextlib.suppress(OSError):
            requests.close()
        wait()
    sys.stdout.flush()
    sys.stderr.flush()
    _send(verdict_out, json.dumps(verdict).encode())


def judge_main() -> None:
    """A judge in a fresh interpreter: the request on stdin, the verdict to the fd in argv."""
    _judge(sys.stdin.buffer.read(), os.fdopen(int(sys.argv[1]), "wb"), forked=False)


def zygote_main() -> None:
    """The zygote: import what checks need, then fork a judge for each request on the control socket
    (fds: the request to read, where to print, where to send the verdict) until the notebook goes."""
    control = socket.socket(fileno=int(sys.argv[1]))
    for module in PRELOAD:
        with contextlib.suppress(ImportError):
            importlib.import_module(module)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # judges are reaped by the kernel
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(control, 1, 3)
        except OSError:
            return
        if not message:
            return
        if os.fork() == 0:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            control.close()
            _judge_child(*fds)
        for fd in fds:
            os.close(fd)


def _judge_child(request_fd: int, output_fd: int, verdict_fd: int) -> None:
    code = 0
    try:
        os.dup2(output_fd, 1)
        os.dup2(output_fd, 2)
        with os.fdopen(request_fd, "rb") as stream:
            request = stream.read()
        _judge(request, os.fdopen(verdict_fd, "wb"), forked=True)
    except BaseException:  # noqa: BLE001 - printed to the notebook, then the exit code says it
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


# -- the sandbox's side -----------------------------------------------------------------------


def _learner_traceback(err: BaseException) -> str:
    """The traceback of the learner's exception without the sandbox's own frames."""
    frames = traceback.extract_tb(err.__traceback__)
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    kept = [f for f in frames if not os.path.abspath(f.filename).startswith(package + os.sep)]
    text = "".join(traceback.format_list(kept)) + "".join(traceback.format_exception_only(type(err), err))
    return ("Traceback (most recent call last):\n" + text)[-_MAX_TEXT:]


def _answer(out: IO[bytes], reply: dict[str, Any]) -> None:
    import torch

    sys.stdout.flush()
    sys.stderr.flush()
    buffer = io.BytesIO()
    torch.save(reply, buffer)
    _send(out, buffer.getvalue())


def sandbox_main() -> None:
    """A sandbox in a fresh interpreter: requests on stdin, answers to the fd in argv."""
    _serve(sys.stdin.buffer, os.fdopen(int(sys.argv[1]), "wb"))


def _serve(requests: IO[bytes], out: IO[bytes]) -> None:
    """Load the learner's code in strict mode, then run requests until ``requests`` closes."""
    from . import strict

    strict.install()
    import cloudpickle

    blob = _receive(requests)
    with strict.Watch():
        try:
            fns, failure = cloudpickle.loads(blob), None
        except BaseException as err:  # noqa: BLE001 - reported to the learner
            fns, failure = (), _learner_traceback(err)
    loading = list(strict.NOTES)
    while (message := _receive(requests)) is not None:
        target, args = pickle.loads(message)
        reply: dict[str, Any] = {}
        with strict.Watch():
            if failure is not None:
                reply["raised"] = failure
            else:
                try:
                    reply["value"] = _resolve(target)(fns, *args)
                except NotImplementedError:
                    reply["not_attempted"] = True
                except BaseException as err:  # noqa: BLE001 - the learner's exception, sent back as text
                    reply["raised"] = _learner_traceback(err)
        reply["tampering"] = loading + list(strict.NOTES)
        _answer(out, reply)
