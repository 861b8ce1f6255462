#!/usr/bin/env bash
# Start each local service the tests need unless something already listens
# on its usual loopback port. Kafka is not here: the test suite starts its
# own Kafka-compatible brokers on free ports.
set -u

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for() {
  local name=$1 port=$2
  for _ in $(seq 1 120); do
    listening "$port" && { echo "services: $name is up on $port"; return 0; }
    sleep 0.5
  done
  echo "services: $name did not come up on port $port" >&2
  return 1
}

ensure() {
  local name=$1 port=$2; shift 2
  if listening "$port"; then
    echo "services: $name already listening on $port"
    return 0
  fi
  echo "services: starting $name"
  "$@" || echo "services: starting $name failed" >&2
  wait_for "$name" "$port"
}

status=0
ensure postgresql 5432 bash -c 'pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start' || status=1
ensure redis 6379 redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log || status=1
ensure rabbitmq 5672 rabbitmq-server -detached || status=1
ensure nats 4222 start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log || status=1
exit $status
