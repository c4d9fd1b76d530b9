"""Names that moved to their own modules stay importable from where they used to be: the dev
tools (demo, bench, chaos) and producers import them from there."""

from __future__ import annotations

import worker.adapters.rabbitmq.names
import worker.domain.runtime_policy
import worker.entrypoints.celery.bridge
import worker.entrypoints.celery.guard
import worker.entrypoints.celery.metrics_step
import worker.entrypoints.celery.sweeper
import worker.entrypoints.celery.task_consumer
from worker.adapters.rabbitmq import celery_config


def test_task_names_and_the_celery_config_are_still_exported_by_the_app_module() -> None:
    from worker.entrypoints.celery import app

    assert (app.TASK_ISSUE, app.TASK_INGEST, app.TASK_RETRY) \
        == worker.adapters.rabbitmq.names.TASK_NAMES
    assert app.settings_of is celery_config.settings_of
    assert app.celery_config is celery_config.celery_config


def test_the_bootsteps_are_still_exported_by_worker_steps() -> None:
    from worker.entrypoints.celery import worker_steps

    assert worker_steps.EventsBridge is worker.entrypoints.celery.bridge.EventsBridge
    assert worker_steps._peek is worker.entrypoints.celery.bridge._peek
    assert worker_steps.Sweeper is worker.entrypoints.celery.sweeper.Sweeper
    assert worker_steps.ConsumptionGuard is worker.entrypoints.celery.guard.ConsumptionGuard
    assert worker_steps.MetricsServer is worker.entrypoints.celery.metrics_step.MetricsServer
    assert worker_steps.prepare_metrics_dir \
        is worker.entrypoints.celery.metrics_step.prepare_metrics_dir
    assert worker_steps.TaskConsumer is worker.entrypoints.celery.task_consumer.TaskConsumer


def test_the_publish_retry_policy_is_still_exported_by_the_publisher() -> None:
    from worker.adapters.rabbitmq import publisher

    assert publisher.PUBLISH_RETRY_POLICY is worker.domain.runtime_policy.PUBLISH_RETRY_POLICY


def test_celery_uses_the_same_publish_retry_policy_and_our_consumer() -> None:
    from worker.config import load_settings

    config = celery_config.celery_config(load_settings(capillary_username="u",
                                                       capillary_password="p"))
    assert config["task_publish_retry_policy"] is worker.domain.runtime_policy.PUBLISH_RETRY_POLICY
    assert config["worker_consumer"] == "worker.entrypoints.celery.task_consumer:TaskConsumer"
