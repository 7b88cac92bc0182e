#!/usr/bin/env bash
# `make run`: run `twistd consumer` in the foreground with tap.conf, against a local broker.
#
# Without AMQP_URL, and with nothing listening on 127.0.0.1:5672 (RUN_LOCAL_PORT), a
# throwaway RabbitMQ node is started there (data in .tmp/local-broker-PORT), AMQP_URL points
# twistd at it, and it is stopped when this script ends.
# Extra arguments go to `twistd consumer`, e.g. `scripts/run-local.sh --queue other`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/bootstrap.sh

port=${RUN_LOCAL_PORT:-5672}
# --handler-path .: the example handler lives in this checkout (examples/tasks.py).
twistd=(.venv/bin/twistd -n --pidfile= consumer --config tap.conf --handler-path . --handler examples.tasks:handle "$@")

answers() { timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$port" 2>/dev/null; }

if [ -n "${AMQP_URL:-}" ] || answers; then
    exec "${twistd[@]}"
fi

# Its own session: a Ctrl-C reaches twistd (through the trap below), not the broker, which
# must outlive the consumer's graceful shutdown. It also stops itself if this script dies.
mkdir -p .tmp
setsid .venv/bin/python -m consumer_svc.testing.rabbitmq serve --port "$port" --dir ".tmp/local-broker-$port" &
broker=$!
export AMQP_URL="amqp://guest:guest@127.0.0.1:$port/%2F"
consumer=""

stop_all() {
    trap - EXIT INT TERM
    if [ -n "$consumer" ] && kill -0 "$consumer" 2>/dev/null; then
        kill -TERM "$consumer" 2>/dev/null || true
        wait "$consumer" 2>/dev/null || true
    fi
    kill -TERM "$broker" 2>/dev/null || true
    wait "$broker" 2>/dev/null || true
}
trap stop_all EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

for _ in $(seq 1 900); do # 90 s
    answers && break
    if ! kill -0 "$broker" 2>/dev/null; then
        echo "run-local: the local RabbitMQ node did not start (see above)" >&2
        exit 1
    fi
    sleep 0.1
done
answers || { echo "run-local: no broker on 127.0.0.1:$port after 90 s" >&2; exit 1; }

# In the background so that this shell can pass INT/TERM on to it and then stop the broker.
"${twistd[@]}" &
consumer=$!
trap 'kill -TERM "$consumer" 2>/dev/null || true' INT TERM
status=0
while kill -0 "$consumer" 2>/dev/null; do
    wait "$consumer" && status=0 || status=$?
done
exit "$status"
