"""SIGINT and SIGTERM in the command, at any moment: exit 130 or 143 with one line, no
temporary file left, an older output untouched.

The entry point's first line holds the two signals back (``hold``: blocked, they wait) and
installs the handlers, before the heavy imports; ``cli.main`` releases them where it can
report an interrupt. A signal becomes an exception in the main thread, ``KeyboardInterrupt``
(SIGINT) or ``Terminated`` (SIGTERM), so that the code's ``finally`` blocks and context
managers clean up as for Ctrl-C. Not where that exception would do harm, though: there the
signal waits, and is raised as soon as the main thread is out of

- an import: a module cut off half-way stays half-initialised for its next user (pyarrow
  imports pandas lazily, in the middle of a run), and an extension's initialisation (torch)
  can meet the exception in C++ code that cannot pass it on (std::terminate, an abort);
- a ``deferred()`` block: steps that must happen together.

One signal per run: those that come while the first one's exception unwinds the stack are
dropped, so that its cleanup is not cut short, and so are those after ``finish`` (the output
is in place, or an error is being reported). An exception that Python had to swallow (raised
in a ``__del__`` or a callback of C code: "Exception ignored") is raised again. Temporary
files named with ``remove_on_interrupt`` are removed by ``clean_up``, wherever the unwinding
was cut off.
"""

from __future__ import annotations

import _thread
import contextlib
import os
import signal
import sys
import time
import types

SIGNALS = (signal.SIGINT, signal.SIGTERM)
RETRY_S = 0.02  # a signal that must wait is tried again this often


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that the same cleanup runs."""


# pending: the signal to raise once it may be; raised: its exception is unwinding the stack;
# previous: the handlers (and the unraisable hook) from before ``install``.
_state = types.SimpleNamespace(installed=False, held=False, previous={}, pending=None,
                               raised=False, finished=False, shields=0, leftovers={})


def hold():
    """Block SIGINT and SIGTERM until ``release`` (the entry point's first line: threads
    started meanwhile keep them blocked, so the main thread receives them)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    _state.held = True


def release():
    """Unblock what ``hold`` blocked: a signal that came meanwhile is handled now."""
    if _state.held:
        _state.held = False
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)


def install() -> bool:
    """Handle SIGINT and SIGTERM as the module docstring says; False (and nothing done) when
    they are handled so already, or outside the main thread (only it receives them)."""
    if _state.installed:
        return False
    try:
        previous = {signum: signal.signal(signum, _handle) for signum in SIGNALS}
    except ValueError:  # not the main thread
        return False
    _state.pending, _state.raised, _state.finished, _state.shields = None, False, False, 0
    _state.leftovers = {}
    _state.previous = {**previous, "hook": sys.unraisablehook}
    sys.unraisablehook = _unraisable
    _state.installed = True
    return True


def uninstall():
    """The handlers from before ``install`` (for callers of ``cli.main`` in a process that
    goes on)."""
    for signum in SIGNALS:
        signal.signal(signum, _state.previous[signum])
    sys.unraisablehook = _state.previous["hook"]
    _state.installed = False


def _handle(signum, frame):
    if _state.raised or _state.finished:
        return  # the first signal's cleanup runs, or the outcome is decided
    _state.pending = _state.pending or signum
    if _state.shields or _importing(frame):
        _retry()
        return
    _state.raised = True
    raise Terminated if _state.pending == signal.SIGTERM else KeyboardInterrupt


def _importing(frame) -> bool:
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib._bootstrap"):
            return True
        frame = frame.f_back
    return False


def _retry():
    _thread.start_new_thread(_deliver, (RETRY_S,))


def _deliver(after: float = 0):
    """The pending signal, to the handler again (in the main thread, as a real one)."""
    time.sleep(after)
    if _state.installed and _state.pending is not None and \
            not (_state.raised or _state.finished):
        _thread.interrupt_main(_state.pending)


def _unraisable(unraisable):
    if _state.installed and _state.raised and isinstance(unraisable.exc_value,
                                                         KeyboardInterrupt):
        _state.raised = False  # ours, swallowed: raised again from ordinary code
        _retry()
        return
    _state.previous["hook"](unraisable)


@contextlib.contextmanager
def deferred():
    """A block that a signal does not cut short: it is raised right after."""
    _state.shields += 1
    try:
        yield
    finally:
        _state.shields -= 1
        if not _state.shields:
            _deliver()


def finish():
    """The outcome is decided (the output is about to be renamed into place, or an error is
    being reported): signals from now on no longer interrupt."""
    _state.finished = True


def ignore():
    """The command has reported its outcome: ignore the signals from now on, through the
    interpreter's shutdown too (which gives a signal with a Python handler its default
    action back: a death by signal instead of the exit code reported)."""
    for signum in SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def remove_on_interrupt(path: str, remove=os.unlink):
    """``path`` is a temporary file until ``forget(path)``: ``clean_up`` removes it (by
    ``remove(path)``: a file in a store has its own way)."""
    _state.leftovers[path] = remove


def forget(path: str):
    _state.leftovers.pop(path, None)


def clean_up():
    """After an interrupt: remove the temporary files that the unwinding did not reach."""
    for path, remove in sorted(_state.leftovers.items()):
        with contextlib.suppress(OSError):
            remove(path)
    _state.leftovers.clear()
