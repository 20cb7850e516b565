"""Celery settings of the product, all derived from the one settings object (``worker.settings``).

Why each reliability setting is what it is (see README, "Guarantees"):
- ``task_acks_late`` + ``task_reject_on_worker_lost``: a message is acknowledged only after its task finished, so a
  worker killed mid-task (kill -9, OOM) leaves it unacknowledged and Redis hands it out again.
- ``visibility_timeout``: how long Redis waits for that acknowledgement before redelivering. It must exceed the
  longest task (a reply is bounded by ALLINONE_REPLY_TIMEOUT_SECONDS), or a slow task would run twice.
- ``worker_prefetch_multiplier = 1``: a single-concurrency worker reserves one message at a time, so live
  messages are not stuck behind a prefetched pile of bulk ones, and a crash strands at most one.
- ``queue_order_strategy = priority``: the worker polls its queues in the order given (live, then bulk) instead of
  round-robin, so live messages go first.
- JSON only: a shared Redis must never make us unpickle what someone else put there.
"""

from kombu import Exchange, Queue

from worker.contract import CLASSIFY_BATCH
from worker.settings import get_settings

_s = get_settings()

broker_url = _s.redis_url
broker_connection_retry_on_startup = True
broker_connection_max_retries = None  # reconnect for ever when Redis goes away
broker_transport_options = {
    "visibility_timeout": _s.visibility_timeout_seconds,
    # Sweep for abandoned (unacknowledged past the visibility timeout) messages every few seconds; kombu's default
    # sweeps about every 100 s, which would add that much to the redelivery after a crash.
    "unacked_restore_interval": max(1, min(10, _s.visibility_timeout_seconds // 2)),
    "unacked_restore_throttle": 1,
    # A broker that vanishes without closing the socket (failover, NAT timeout) must not hang a publish for ever.
    "socket_timeout": 30,
    "queue_order_strategy": "priority",
    "socket_keepalive": True,
    "socket_connect_timeout": 5,
    "retry_on_timeout": True,
    "health_check_interval": 10,
}

# Producers retry a publish while Redis is away, then raise: never a silent loss.
task_publish_retry = True
task_publish_retry_policy = {"max_retries": 6, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 2.0}

task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
event_serializer = "json"

# Results live in our own store, keyed by conversation id; Celery's result backend is not used (chains do not
# need it: the worker sends the next task itself when one finishes).
task_ignore_result = True
result_backend = None

task_acks_late = True
task_reject_on_worker_lost = True
task_acks_on_failure = True  # a task that raised is finished: acknowledge, never redeliver a poison message
task_acks_on_timeout = True
worker_prefetch_multiplier = 1
worker_cancel_long_running_tasks_on_connection_loss = True
worker_concurrency = 1
worker_pool = "solo"
worker_send_task_events = False

task_default_queue = _s.live_queue
# Each queue on its own direct exchange: a message sent to one queue never lands in the other.
task_queues = (
    Queue(_s.live_queue, Exchange(_s.live_queue, type="direct"), routing_key=_s.live_queue),
    Queue(_s.bulk_queue, Exchange(_s.bulk_queue, type="direct"), routing_key=_s.bulk_queue),
)
task_default_exchange = _s.live_queue
task_default_routing_key = _s.live_queue
task_routes = {CLASSIFY_BATCH: {"queue": _s.bulk_queue}}
task_create_missing_queues = True
