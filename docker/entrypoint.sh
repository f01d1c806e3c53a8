#!/bin/sh
# The image's entrypoint (under tini): a gsrl command name runs as `gsrl <command> ...`, anything else runs as is,
# so `docker run gsrl env-server -c run.yaml` and `docker run gsrl torchrun ...` both work.
set -e
case "${1:-}" in
  train|env-server|policy-server|learner|eval|config)
    exec gsrl "$@"
    ;;
esac
exec "$@"
