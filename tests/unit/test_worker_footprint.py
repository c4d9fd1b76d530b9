"""What the worker's main process holds when its pool forks: every page resident there is
resident in each pool process too, so ``coupon-worker worker`` loads what a worker needs and
nothing the other commands need (``rich``, their modules, Pygments), nor SQLAlchemy's ORM."""

from __future__ import annotations

import gc
import importlib
import json
import os
import signal
import subprocess
import sys
import weakref
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import click
import pytest
from celery.concurrency.prefork import TaskPool as PreforkPool
from click.testing import CliRunner

from worker.entrypoints.celery.worker_steps import _freeze_before_fork, release_free_heap
from worker.entrypoints.cli import root
from worker.optional_modules import without

# Run as the installed script would be; stops the worker at ``worker_init`` (sent once the app
# is loaded and before the pool forks) and prints what the process has imported by then. The
# receiver is connected first: before the app's own (the schema check would connect).
AT_WORKER_INIT = """
import importlib.machinery, json, os, sys

def report(**_):
    import ctypes
    from celery import platforms
    # What each prefork pool process does first (celery.concurrency.prefork), read back here.
    platforms.set_pdeathsig("SIGKILL")
    signal = ctypes.c_int()
    ctypes.CDLL(None).prctl(2, ctypes.byref(signal))  # PR_GET_PDEATHSIG
    print(json.dumps({"modules": sorted(sys.modules), "pdeathsig": signal.value}))
    sys.stdout.flush()
    os._exit(0)

class ConnectOnceLoaded:
    # Celery is imported by the command itself, as it would be without this check.
    def find_spec(self, name, path, target=None):
        if name != "worker.entrypoints.celery.liveness":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            module.signals.worker_init.connect(report, weak=False)

        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, ConnectOnceLoaded())
from worker.entrypoints.cli import main
main(["worker", "--pool", "prefork", "--concurrency", "1"])
"""

def _at_worker_init(tmp_path: Path) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COUPONS_", "CAPILLARY_"))}
    env.update({"COUPONS_ENV_FILE": "", "CAPILLARY_USERNAME": "u", "CAPILLARY_PASSWORD": "p",
                "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)})
    done = subprocess.run([sys.executable, "-c", AT_WORKER_INIT], env=env, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    reported: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return reported


def test_the_worker_command_forks_its_pool_without_the_other_commands(tmp_path: Path) -> None:
    reported = _at_worker_init(tmp_path)
    modules = set(reported["modules"])
    assert "worker.entrypoints.celery.app" in modules, "the check ran before the app loaded"
    assert not {m for m in modules if m == "rich" or m.startswith("rich.")}
    assert "pygments" not in modules, "celery.bin.base's help colours"
    assert "psutil" not in modules, "celery.utils.debug's memdump"
    assert "yaml" not in modules, "kombu's YAML serializer"
    # billiard sets each pool process's parent-death signal with ctypes, not cffi and
    # pycparser (1.5 MB a process), and the signal is still set that way.
    assert not {"cffi", "pycparser"} & modules
    assert reported["pdeathsig"] == signal.SIGKILL
    assert not {m for m in modules if m.startswith("sqlalchemy.orm")}, "the ledger is core"
    # The sweeper's and the metrics endpoint's: they run in the main process, after the fork.
    assert not {"worker.usecases.sweep", "worker.usecases.replay_jobs", "worker.usecases.retention",
                "worker.scrape", "worker.adapters.postgres.vitals"} & modules
    commands = {m.rsplit(".", 1)[1] for m in modules
                if m.startswith("worker.entrypoints.cli.")}
    assert commands == {"root", "runtime"}


def test_a_module_kept_out_is_importable_again_after() -> None:
    assert "tabnanny" not in sys.modules
    with without(["tabnanny"]), pytest.raises(ImportError):
        importlib.import_module("tabnanny")
    assert importlib.import_module("tabnanny") is sys.modules["tabnanny"]


def test_every_command_is_found_by_name_and_listed() -> None:
    ctx = click.Context(root.main)
    for name in root.COMMAND_MODULES:
        command = root.main.get_command(ctx, name)
        assert command is not None and command.name == name
    # Nothing registers a command the lazy table does not know of (it would stay hidden).
    runtime = {name for name in root.main.commands if name != "zz-docs-probe"}
    assert runtime == set(root.COMMAND_MODULES)
    assert root.main.list_commands(ctx) == sorted({*root.COMMAND_MODULES,
                                                   *root.DEVTOOL_COMMANDS})


# The subcommands a group has in a fresh process once it is asked for, as a JSON list.
SUBCOMMANDS = """
import json, sys
import click
from worker.entrypoints.cli import root
from worker.optional_modules import without
ctx = click.Context(root.main)
group = root.main.get_command(ctx, sys.argv[1])
print(json.dumps(sorted(group.commands) if isinstance(group, click.Group) else []))
"""


@pytest.mark.parametrize("name", sorted(root.COMMAND_MODULES))
def test_a_command_asked_for_alone_has_all_its_subcommands(name: str) -> None:
    # A module that adds a subcommand to another module's group must be listed with it.
    done = subprocess.run([sys.executable, "-c", SUBCOMMANDS, name], capture_output=True,
                          text=True, timeout=60, check=True)
    for module in {m for modules in root.COMMAND_MODULES.values() for m in modules}:
        __import__(f"worker.entrypoints.cli.{module}")
    everything = root.main.commands[name]
    expected = sorted(everything.commands) if isinstance(everything, click.Group) else []
    assert json.loads(done.stdout) == expected


def test_a_subcommand_of_a_lazy_group_runs() -> None:
    result = CliRunner().invoke(root.main, ["console", "sessions", "--help"])
    assert result.exit_code == 0, result.output
    assert "revoke" in result.output


def test_the_start_up_garbage_is_collected_not_frozen_before_prefork_forks() -> None:
    class Node:
        other: Any = None

    # A cycle only the collector frees: left to the freeze, it would stay resident for good.
    first, second = Node(), Node()
    first.other, second.other = second, first
    alive = weakref.ref(first)
    del first, second
    gc.unfreeze()
    try:
        _freeze_before_fork(SimpleNamespace(pool_cls=PreforkPool))
        assert alive() is None
    finally:
        gc.unfreeze()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_the_free_c_heap_is_handed_back_on_linux() -> None:
    assert release_free_heap() is True
