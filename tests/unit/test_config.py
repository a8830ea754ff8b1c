"""Settings: parsing, defaults, and start-up refusals that name the fix."""

from __future__ import annotations

import pytest

from agent_workers.config import Settings
from agent_workers.errors import ConfigError


def test_defaults_point_at_local_redis() -> None:
    s = Settings.from_env({})
    assert s.broker_url == "redis://127.0.0.1:6379/0"
    assert s.result_backend.startswith("redis://")
    assert s.batch.max_batch_size == 64 and s.batch.mode == "fixed"
    assert s.broker_is_redis


def test_amqp_broker_is_accepted() -> None:
    s = Settings.from_env({"AGENT_WORKERS_BROKER_URL": "amqp://guest:guest@127.0.0.1:5672//"})
    assert not s.broker_is_redis


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"AGENT_WORKERS_MAX_BATCH_SIZE": "-3"}, "AGENT_WORKERS_MAX_BATCH_SIZE=-3 is too small"),
        ({"AGENT_WORKERS_MAX_BATCH_SIZE": "lots"}, "is not an integer"),
        ({"AGENT_WORKERS_MAX_WAIT_MS": "soon"}, "is not a number"),
        ({"AGENT_WORKERS_BROKER_URL": "kafka://x"}, "has scheme 'kafka'"),
        ({"AGENT_WORKERS_RESULT_BACKEND": "amqp://x"}, "AGENT_WORKERS_RESULT_BACKEND"),
        ({"AGENT_WORKERS_DEVICE": "tpu"}, "use auto, cpu, cuda or cuda:N"),
        ({"AGENT_WORKERS_BATCH_MODE": "magic"}, "is not one of adaptive, fixed"),
        ({"AGENT_WORKERS_TRACK_STARTED": "maybe"}, "is not a boolean"),
        (
            {"AGENT_WORKERS_VISIBILITY_TIMEOUT": "60", "AGENT_WORKERS_TASK_TIME_LIMIT": "600"},
            "must exceed AGENT_WORKERS_TASK_TIME_LIMIT",
        ),
        ({"AGENT_WORKERS_NAMESPACE": "a:b"}, "AGENT_WORKERS_NAMESPACE"),
    ],
)
def test_bad_settings_fail_with_the_variable_named(env: dict[str, str], fragment: str) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        Settings.from_env(env)
    assert fragment in str(info.value)


def test_visibility_timeout_only_matters_on_a_redis_broker() -> None:
    s = Settings.from_env(
        {
            "AGENT_WORKERS_BROKER_URL": "amqp://guest:guest@127.0.0.1:5672//",
            "AGENT_WORKERS_VISIBILITY_TIMEOUT": "60",
            "AGENT_WORKERS_TASK_TIME_LIMIT": "600",
        }
    )
    assert s.visibility_timeout == 60


def test_plugins_are_split_and_trimmed() -> None:
    s = Settings.from_env({"AGENT_WORKERS_PLUGINS": " a.b , c ,,"})
    assert s.plugins == ("a.b", "c")


def test_cuda_index_is_a_valid_device() -> None:
    assert Settings.from_env({"AGENT_WORKERS_DEVICE": "cuda:1"}).device == "cuda:1"


def test_queue_max_priority_declares_x_max_priority_on_classic_queues_only() -> None:
    from agent_workers.contract import declare_queue

    amqp = "amqp://guest:guest@127.0.0.1:5672//"
    settings = Settings.from_env({"AGENT_WORKERS_BROKER_URL": amqp, "AGENT_WORKERS_QUEUE_MAX_PRIORITY": "10"})
    assert settings.queue_max_priority == 10
    assert declare_queue("q", max_priority=10).queue_arguments == {"x-max-priority": 10}
    assert not declare_queue("q").queue_arguments  # what a bare Celery producer declares
    with pytest.raises(ConfigError, match="quorum"):
        Settings.from_env(
            {
                "AGENT_WORKERS_BROKER_URL": amqp,
                "AGENT_WORKERS_QUEUE_MAX_PRIORITY": "5",
                "AGENT_WORKERS_QUEUE_TYPE": "quorum",
            }
        )
    with pytest.raises(ConfigError, match="255"):
        Settings.from_env({"AGENT_WORKERS_QUEUE_MAX_PRIORITY": "256"})


@pytest.mark.parametrize(
    ("variable", "value", "fragment"),
    [
        ("LOCK_TIMEOUT", "inf", "is not finite; set a finite number from 0.1 to 60.0"),
        ("LOCK_TIMEOUT", "nan", "is not finite"),
        ("LOCK_TIMEOUT", "600", "is too large; set a finite number from 0.1 to 60.0"),
        ("MAX_WAIT_MS", "inf", "AGENT_WORKERS_MAX_WAIT_MS='inf' is not finite"),
        ("MIN_VERSION_WAIT_MS", "Infinity", "AGENT_WORKERS_MIN_VERSION_WAIT_MS='Infinity' is not finite"),
        ("LATENCY_TARGET_MS", "-inf", "is not finite"),
        ("RESULT_EXPIRES", str(10**17), "AGENT_WORKERS_RESULT_EXPIRES=100000000000000000 is too large"),
        ("TASK_TIME_LIMIT", str(10**12), "AGENT_WORKERS_TASK_TIME_LIMIT=1000000000000 is too large"),
        ("VISIBILITY_TIMEOUT", str(10**12), "AGENT_WORKERS_VISIBILITY_TIMEOUT=1000000000000 is too large"),
        (
            "MAX_BATCH_SIZE",
            "40000",
            "AGENT_WORKERS_MAX_BATCH_SIZE=40000 is too large; set a whole number from 1 to 32767",
        ),
        ("TRAIN_GROUP", "40000", "AGENT_WORKERS_TRAIN_GROUP=40000 is too large"),
    ],
)
def test_settings_out_of_range_fail_at_start_up_naming_the_range(variable: str, value: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({f"AGENT_WORKERS_{variable}": value})
    assert fragment in str(info.value)


def test_settings_at_their_maxima_are_accepted() -> None:
    from agent_workers import config
    from agent_workers.store.locks import DEFAULT_LOCK_WAIT

    s = Settings.from_env(
        {
            "AGENT_WORKERS_LOCK_TIMEOUT": str(config.MAX_LOCK_TIMEOUT),
            "AGENT_WORKERS_RESULT_EXPIRES": str(config.MAX_SECONDS),
            "AGENT_WORKERS_MAX_BATCH_SIZE": str(config.MAX_BATCH_SIZE),
            "AGENT_WORKERS_MIN_VERSION_WAIT_MS": str(config.MAX_WAIT_MS),
        }
    )
    assert s.lock_timeout == config.MAX_LOCK_TIMEOUT and s.batch.max_batch_size == config.MAX_BATCH_SIZE
    assert config.MAX_LOCK_TIMEOUT < DEFAULT_LOCK_WAIT  # a lock always expires before a waiter gives up
