#!/bin/sh
# The router in front of plm-serve replicas: Shepherd Model Gateway (`pip install smg==1.13.0`, the version
# pinned in requirements/constraints.txt; image docker.io/lightseekorg/smg:1.13.0). On hosts you manage:
#   deploy/router/smg-launch.sh --worker-urls http://gpu-host-1:8000 http://gpu-host-2:8000
# Flags given here come last and so override the defaults below. The same routing settings appear in
# deploy/docker-compose.yml and deploy/kubernetes/router.yaml; tests/deploy keeps the three equal.
#
# --policy cache_aware: each request goes to the replica whose radix tree of recently routed request text
#   shares the longest prefix with it (so a repeated system prompt, image + question or conversation lands
#   where its KV blocks and encoder outputs are cached); below --cache-threshold (matched share) it goes to
#   the least-loaded replica, and a replica more than --balance-abs-threshold requests AND
#   --balance-rel-threshold times over the fleet mean is skipped, so affinity never overloads one replica.
# --health-*: /health answers 503 while a replica loads, drains (SIGTERM) or lost its engine; two failed
#   probes 5 s apart take it out of rotation, and a request already sent to a dead replica is retried on
#   another (smg retries connection errors and 429/5xx with backoff).
# --max-payload-size: plm-serve's own --max-request-body-bytes default (128 MiB), so the limit and its 413
#   come from one place.
set -eu
exec smg launch \
    --host 0.0.0.0 --port 30000 \
    --policy cache_aware --cache-threshold 0.3 \
    --balance-abs-threshold 64 --balance-rel-threshold 1.5 \
    --health-check-endpoint /health --health-check-interval-secs 5 \
    --health-failure-threshold 2 --health-success-threshold 1 \
    --max-payload-size 134217728 \
    --prometheus-host 0.0.0.0 --prometheus-port 29000 \
    --log-json \
    "$@"
