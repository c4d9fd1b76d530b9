"""Names that moved to their own modules stay importable from where they used to be: the dev
tools (demo, bench, chaos) and producers import them from there."""

from __future__ import annotations

import worker.broker.bridge
import worker.broker.guard
import worker.broker.metrics_step
import worker.broker.sweeper
import worker.broker.task_consumer
import worker.names
import worker.policy
from worker.broker import celery_config


def test_task_names_and_the_celery_config_are_still_exported_by_the_app_module() -> None:
    from worker import celery_app

    assert (celery_app.TASK_ISSUE, celery_app.TASK_INGEST, celery_app.TASK_RETRY) \
        == worker.names.TASK_NAMES
    assert celery_app.settings_of is celery_config.settings_of
    assert celery_app.celery_config is celery_config.celery_config


def test_the_bootsteps_are_still_exported_by_worker_steps() -> None:
    from worker.broker import worker_steps

    assert worker_steps.EventsBridge is worker.broker.bridge.EventsBridge
    assert worker_steps._peek is worker.broker.bridge._peek
    assert worker_steps.Sweeper is worker.broker.sweeper.Sweeper
    assert worker_steps.ConsumptionGuard is worker.broker.guard.ConsumptionGuard
    assert worker_steps.MetricsServer is worker.broker.metrics_step.MetricsServer
    assert worker_steps.prepare_metrics_dir is worker.broker.metrics_step.prepare_metrics_dir
    assert worker_steps.TaskConsumer is worker.broker.task_consumer.TaskConsumer


def test_the_publish_retry_policy_is_still_exported_by_the_publisher() -> None:
    from worker.broker import publisher

    assert publisher.PUBLISH_RETRY_POLICY is worker.policy.PUBLISH_RETRY_POLICY


def test_celery_uses_the_same_publish_retry_policy_and_our_consumer() -> None:
    from worker.config import load_settings

    config = celery_config.celery_config(load_settings(capillary_username="u",
                                                       capillary_password="p"))
    assert config["task_publish_retry_policy"] is worker.policy.PUBLISH_RETRY_POLICY
    assert config["worker_consumer"] == "worker.broker.task_consumer:TaskConsumer"
