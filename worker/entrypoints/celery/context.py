"""What a bootstep reaches from its Celery app: the settings, the container and the links.

The container is the one object the composition root (``worker.entrypoints.celery.app``) attaches to
the app; everything else a step needs is reached through it.
"""

from __future__ import annotations

from typing import Any

from worker.adapters.rabbitmq.celery_config import settings_of
from worker.adapters.rabbitmq.links import StepLinks
from worker.bootstrap import Container
from worker.config import Settings

__all__ = ["container_of", "links_of", "settings_of", "step_settings"]


def container_of(app: Any) -> Container:
    """The app's per-process dependencies (``worker.bootstrap.Container``)."""
    container: Container = app.coupon_container
    return container


def links_of(app: Any) -> StepLinks:
    """How the steps of this app's worker find each other."""
    return container_of(app).links


def step_settings(parent: Any) -> Settings:
    """The settings of a step's parent (the worker or its consumer)."""
    return settings_of(parent.app)
