"""Which Celery pools the worker starts on, and what it prepares for each."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from celery.concurrency.prefork import TaskPool as PreforkPool
from celery.concurrency.solo import TaskPool as SoloPool
from celery.concurrency.thread import TaskPool as ThreadsPool

from worker.entrypoints.celery.app import create_app
from worker.entrypoints.celery.context import container_of, pool_name
from worker.entrypoints.celery.worker_steps import _freeze_before_fork, _require_supported_pool


def controller(pool: Any, concurrency: int = 4) -> Any:
    """What Celery's ``worker_init`` signal sends: the worker, its pool class and app."""
    return SimpleNamespace(pool_cls=pool, concurrency=concurrency, app=create_app())


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()


def test_pools_are_named_by_class_or_by_path() -> None:
    assert pool_name(controller(PreforkPool)) == "prefork"
    assert pool_name(controller(ThreadsPool)) == "threads"
    assert pool_name(controller("celery.concurrency.thread:TaskPool")) == "threads"
    assert pool_name(controller(SoloPool)) == "celery.concurrency.solo:TaskPool"


@pytest.mark.parametrize("pool", [SoloPool, "celery.concurrency.gevent:TaskPool"])
def test_a_pool_that_cannot_keep_an_attempt_inside_its_claim_is_refused(pool: Any) -> None:
    with pytest.raises(SystemExit, match="runs on the prefork or threads pool, not"):
        _require_supported_pool(controller(pool))


def test_the_threads_pool_sizes_the_process_for_its_threads() -> None:
    worker = controller(ThreadsPool, concurrency=64)
    _require_supported_pool(worker)
    assert container_of(worker.app).threads == 64
    prefork = controller(PreforkPool, concurrency=64)
    _require_supported_pool(prefork)
    assert container_of(prefork.app).threads == 1, "a prefork child runs one task at a time"


def test_what_the_main_process_loaded_is_frozen_before_prefork_forks(unfrozen: None) -> None:
    _freeze_before_fork(controller(ThreadsPool))
    assert gc.get_freeze_count() == 0, "nothing forks under threads"
    _freeze_before_fork(controller(PreforkPool))
    assert gc.get_freeze_count() > 0
