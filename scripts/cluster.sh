#!/usr/bin/env bash
# A local collab cluster (issue #14): one Redis (AOF on, appendfsync always, no eviction), N collab
# instances in cluster mode (`--redis-url`), each with its own port and data folder, and nginx as a
# round-robin load balancer in front of them that carries WebSockets, the demo page and the HTTP
# API. Open http://127.0.0.1:PORT/#doc=NAME in several tabs: the tabs land on different instances
# (nginx's access log names the instance of each request) and edit the same document.
# Ctrl-C stops everything.
#
#   scripts/cluster.sh                     # release build, nginx on 8080, instances on 8081-8083
#   scripts/cluster.sh --debug             # target/debug/collab instead
#   scripts/cluster.sh --port 9000 --instances 2 --redis-port 6390 --dir /tmp/my-cluster
#   scripts/cluster.sh -- --awareness-batch-ms 0   # anything after -- goes to every instance
#
# Without --dir everything lives in a fresh temporary folder, removed at exit; with --dir the
# folder is kept, so Redis' AOF and the instances' data survive a restart of the script.
# COLLAB_BIN=/path/to/collab skips the cargo build. Needs redis-server and nginx (Debian's
# packages; .ci/run installs them) and curl. Nothing runs as a daemon: every process is a child
# of this script, on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."

profile=release
port=8080
instances=3
redis_port=6380
dir=""
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --debug) profile=debug ;;
    --release) profile=release ;;
    --port) port="$2"; shift ;;
    --instances) instances="$2"; shift ;;
    --redis-port) redis_port="$2"; shift ;;
    --dir) dir="$2"; shift ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

# nginx lives in /usr/sbin, which is not on every user's PATH.
nginx_bin="$(command -v nginx || true)"
[ -n "$nginx_bin" ] || { [ -x /usr/sbin/nginx ] && nginx_bin=/usr/sbin/nginx; }
for need in redis-server redis-cli curl; do
  command -v "$need" >/dev/null || { echo "cluster.sh: $need not found (apt-get install redis-server curl)" >&2; exit 1; }
done
[ -n "$nginx_bin" ] || { echo "cluster.sh: nginx not found (apt-get install nginx)" >&2; exit 1; }

if [ -n "${COLLAB_BIN:-}" ]; then
  bin="$COLLAB_BIN"
else
  if [ "$profile" = release ]; then cargo build --release -p collab-server --bin collab
  else cargo build -p collab-server --bin collab; fi
  bin="$PWD/target/$profile/collab"
fi

if [ -n "$dir" ]; then
  mkdir -p "$dir"
  dir="$(cd "$dir" && pwd)"
  keep=1
else
  dir="$(mktemp -d "${TMPDIR:-/tmp}/collab-cluster.XXXXXX")"
  keep=""
fi

pids=()
stopping=""
stop_all() {
  [ -z "$stopping" ] || return 0
  stopping=1
  echo
  echo "== stopping"
  # Load balancer first so no client lands on an instance that is going away, Redis last so the
  # instances' final writes reach it.
  local i t
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    kill -TERM "${pids[$i]}" 2>/dev/null || true
    # Bounded: a process that ignores SIGTERM must not keep its port after the script is gone.
    for ((t = 0; t < 100; t++)); do
      kill -0 "${pids[$i]}" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "${pids[$i]}" 2>/dev/null || true
    wait "${pids[$i]}" 2>/dev/null || true
  done
  if [ -z "$keep" ]; then rm -rf "$dir"; else echo "kept $dir"; fi
}
trap stop_all EXIT
trap 'exit 130' INT TERM

wait_for() { # what, seconds, command...
  local what="$1" secs="$2"
  shift 2
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "cluster.sh: $what did not come up within ${secs} s; logs in $dir" >&2
      keep=1
      exit 1
    fi
    sleep 0.2
  done
}

# --- Redis: the settings that keep "durable before visible" (see README, Cluster mode) ---
mkdir -p "$dir/redis"
cat > "$dir/redis.conf" <<EOF
bind 127.0.0.1
port $redis_port
dir $dir/redis
daemonize no
appendonly yes
appendfsync always
maxmemory-policy noeviction
# The AOF is the copy; without save points Redis also never refuses a SIGTERM over a failed RDB.
save ""
logfile $dir/redis.log
EOF
redis-server "$dir/redis.conf" &
pids=("$!")
wait_for "redis-server on port $redis_port" 10 redis-cli -p "$redis_port" ping
echo "== redis on 127.0.0.1:$redis_port (AOF appendfsync always), data in $dir/redis"

# --- collab instances, in cluster mode ---
upstreams=""
for ((i = 1; i <= instances; i++)); do
  p=$((port + i))
  mkdir -p "$dir/collab-$i"
  "$bin" --addr "127.0.0.1:$p" --data-dir "$dir/collab-$i" \
    --redis-url "redis://127.0.0.1:$redis_port" --trusted-proxies 127.0.0.1/32 \
    ${extra[@]+"${extra[@]}"} > "$dir/collab-$i.log" 2>&1 &
  pids+=("$!")
  upstreams+="    server 127.0.0.1:$p max_fails=1 fail_timeout=5s;"$'\n'
done
for ((i = 1; i <= instances; i++)); do
  p=$((port + i))
  wait_for "collab instance $i (port $p, log $dir/collab-$i.log)" 30 curl -fsS "http://127.0.0.1:$p/readyz"
  echo "== collab $i on 127.0.0.1:$p, data in $dir/collab-$i, log $dir/collab-$i.log"
done

# --- nginx: a foreground process with everything under $dir ---
mkdir -p "$dir/nginx/tmp"
cat > "$dir/nginx/nginx.conf" <<EOF
worker_processes 1;
pid $dir/nginx/nginx.pid;
error_log $dir/nginx/error.log notice;
$( [ "$(id -u)" = 0 ] && echo "user root;  # workers write under $dir, which only root may enter" )
events { worker_connections 4096; }
http {
  client_body_temp_path $dir/nginx/tmp/body;
  proxy_temp_path $dir/nginx/tmp/proxy;
  fastcgi_temp_path $dir/nginx/tmp/fastcgi;
  uwsgi_temp_path $dir/nginx/tmp/uwsgi;
  scgi_temp_path $dir/nginx/tmp/scgi;
  log_format cluster '\$remote_addr "\$request" \$status upstream=\$upstream_addr';
  access_log $dir/nginx/access.log cluster;

  # Upgrade requests get "Connection: upgrade", the others a plain proxied request.
  map \$http_upgrade \$connection_upgrade {
    default upgrade;
    ''      close;
  }
  upstream collab {
    # round-robin: a socket lands on any instance, whichever document it opens
$upstreams  }
  server {
    listen 127.0.0.1:$port;
    location / {
      proxy_pass http://collab;
      proxy_http_version 1.1;
      proxy_set_header Upgrade \$http_upgrade;
      proxy_set_header Connection \$connection_upgrade;
      proxy_set_header Host \$host;
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
      # A WebSocket is idle between edits; collab pings every 30 s, so an hour is never reached
      # by a live client (nginx's default of 60 s would be, with a longer --heartbeat-secs).
      proxy_read_timeout 1h;
      proxy_send_timeout 1h;
      # An instance that refuses (503 while Redis is down) is skipped for plain HTTP requests.
      proxy_next_upstream error timeout http_503;
    }
  }
}
EOF
"$nginx_bin" -t -q -e "$dir/nginx/error.log" -p "$dir/nginx" -c "$dir/nginx/nginx.conf"
"$nginx_bin" -e "$dir/nginx/error.log" -p "$dir/nginx" -c "$dir/nginx/nginx.conf" -g 'daemon off;' &
pids+=("$!")
wait_for "nginx on port $port" 10 curl -fsS "http://127.0.0.1:$port/healthz"

cat <<EOF

== cluster up: $instances collab instances behind nginx
   demo page:   http://127.0.0.1:$port/#doc=cluster-demo   (open it in several tabs)
   which tab landed where: tail -f $dir/nginx/access.log   (upstream=127.0.0.1:PORT per request)
   an instance: http://127.0.0.1:$((port + 1))/metrics (collab_redis_up, collab_connections)
   redis:       redis-cli -p $redis_port xlen 'collab:{cluster-demo}:log'
   Ctrl-C stops everything.
EOF

# Any child that exits ends the cluster, so a crashed instance is not hidden behind nginx.
set +e
wait -n "${pids[@]}"
code=$?
if [ -z "$stopping" ]; then
  echo "cluster.sh: a process exited (code $code); logs in $dir" >&2
  keep=1
fi
exit "$code"
