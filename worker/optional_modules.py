"""Optional modules that libraries import whenever they are installed, kept out of the worker.

Celery and Kombu import some modules at start-up only because they are installed, for things a
worker never does: Pygments colours Celery's help texts, psutil serves the ``memdump`` remote
command, PyYAML the YAML serializer (the worker accepts JSON only). None of them is a dependency
of ours: the dev tools bring them (``rich``, ``pgserver``, ``mkdocs``). cffi is one (the
console's password hashing needs it), but billiard, once it has imported cffi, sets each pool
process's parent-death signal through it: that declares a C prototype, which loads pycparser,
1.5 MB in every pool process, where ``ctypes`` (billiard's other way, and already loaded) costs
nothing. Nothing else in the worker imports cffi; if something did after start-up, billiard
would fail to set that signal (it checks ``sys.modules`` at each fork):
``tests/unit/test_worker_footprint.py`` checks it is set, and ``tests/acceptance/test_fleet.py``
that the pool processes of a SIGKILLed worker end with it. A worker's main process holds what
it imported when its pool forks, and each pool process with it, so the worker command imports
Celery without them (about 4 MB a process, and 1.5 MB more for cffi): installed or not, the
worker runs as in production, where the first three are absent.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

#: What the worker's process imports Celery and Kombu without.
WORKER_UNUSED = ("pygments", "psutil", "yaml", "cffi")


@contextmanager
def without(names: Iterable[str]) -> Iterator[None]:
    """Imports of ``names`` fail inside the block (as if not installed), unless already done."""
    blocked = [name for name in names if name not in sys.modules]
    for name in blocked:
        sys.modules[name] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        for name in blocked:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]
