"""The key names of what a model replica reports about itself, in one place for writers and readers.

Written by ModelReplica (serve_app/deployments.py) and ReplicaCore.snapshot (serve_app/core.py);
read by the router (serve_app/router.py), the autoscaling policy (serve_app/autoscaling.py), the
Prometheus rendering (serve_app/metrics_exposition.py), tests and load reports.
"""

from __future__ import annotations

# Serve's custom autoscaling metrics (record_autoscaling_stats) and routing stats (record_routing_stats).
ENGINE_LOAD = "engine_load"  # running + waiting sequences in the engine, all adapters
KV_USAGE = "kv_usage"  # used / total KV blocks
QUEUE_WAIT_S = "queue_wait_s"  # age of the oldest waiting request
DEVICE_ADAPTERS = "device_adapters"  # adapter ids resident in device slots (also in a snapshot)

# A replica snapshot (/metrics, /admin/stats): who answered, its request metrics, its engine stats.
SNAPSHOT_REPLICA = "replica"
SNAPSHOT_METRICS = "metrics"
SNAPSHOT_ENGINE = "engine"
