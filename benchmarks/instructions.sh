#!/usr/bin/env bash
# Instructions per cache miss and per cache hit, counted by callgrind: figures that do not
# move with the machine's load, for comparing two versions of the query paths on a noisy host.
#
#   benchmarks/instructions.sh [QUERIES] [OFFERED_QPS] [HIT_QPS]   (defaults 6000, 5000, 20000)
#   TRANSPORT=tls benchmarks/instructions.sh      (tcp by default; also auto, udp, tls)
#   BUILD=pure benchmarks/instructions.sh         (the pure-Python modules; by default the
#                                                  checkout as it is: compiled after
#                                                  `make compiled`, else pure Python)
#   KEEP=DIR benchmarks/instructions.sh           (keeps the callgrind dumps, miss.out and
#                                                  hit.out, in DIR for callgrind_annotate)
#
# Starts Unbound on loopback (any name under bench.test answers an A record), dnsproxy
# under `valgrind --tool=callgrind` forwarding to it over TCP, and dnsperf asking QUERIES
# unique names at OFFERED_QPS, more than dnsproxy manages under valgrind, so it runs
# saturated and batches as it does at full speed. Counting is switched on only around the
# dnsperf run (callgrind_control --zero / --dump), so start-up and shutdown are not in
# the figure. Then the same QUERIES names are asked again, now all cached, at HIT_QPS (also
# more than dnsproxy answers under valgrind) and counted the same way. Needs valgrind, unbound, dnsperf and dig (Debian packages of those names,
# dig in dnsutils). User-space instructions only: the kernel's share is not counted (with
# TRANSPORT=tls, OpenSSL's work in dnsproxy's process is; the certificate comes from openssl).
set -euo pipefail
cd "$(dirname "$0")/.."
TRANSPORT=${TRANSPORT:-tcp}
N=${1:-6000}
QPS=${2:-5000}
HIT_QPS=${3:-20000}
PY=${PYTHON:-.venv/bin/python}
for tool in valgrind callgrind_control unbound dnsperf dig; do
    command -v "$tool" >/dev/null || { echo "needs $tool (apt-get install valgrind unbound dnsperf dnsutils)" >&2; exit 2; }
done
work=$(mktemp -d /tmp/dnsproxy-instr-XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
read -r up_port dp_port tls_port < <("$PY" -c '
import socket
ports = []
for _ in range(3):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); ports.append(s.getsockname()[1]); s.close()
print(*ports)')

cat > "$work/unbound.conf" <<EOF
server:
  interface: 127.0.0.1@$up_port
  port: $up_port
  do-daemonize: no
  use-syslog: no
  logfile: ""
  username: ""
  chroot: ""
  directory: "$work"
  pidfile: ""
  num-threads: 1
  do-ip6: no
  verbosity: 0
  local-zone: "." refuse
  local-zone: "bench.test." redirect
  local-data: "bench.test. 3600 IN A 169.254.1.1"
EOF
upstream="\"$TRANSPORT://127.0.0.1:$up_port\""
if [ "$TRANSPORT" = tls ]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
        -keyout "$work/key.pem" -out "$work/cert.pem" -subj /CN=dot.bench.test \
        -addext subjectAltName=DNS:dot.bench.test 2> /dev/null
    cat >> "$work/unbound.conf" <<EOF
  interface: 127.0.0.1@$tls_port
  tls-port: $tls_port
  tls-service-key: "$work/key.pem"
  tls-service-pem: "$work/cert.pem"
EOF
    upstream="{address: \"tls://127.0.0.1:$tls_port#dot.bench.test\", ca_file: \"$work/cert.pem\"}"
fi
cat > "$work/dnsproxy.yaml" <<EOF
listen: ["127.0.0.1:$dp_port"]
http_listen: null
cache: {max_entries: $((N + 1000))}
# Saturated under valgrind on purpose (see above): shedding would answer misses early.
limits: {shed_after_s: 0}
zones:
  - zone: "."
    upstreams: [$upstream]
    try_timeout_s: 10
    deadline_s: 20
log: {level: warning}
EOF
tag=r$RANDOM$RANDOM
for ((i = 0; i < N; i++)); do echo "$tag-h$i.bench.test A"; done > "$work/names.txt"

unbound -d -c "$work/unbound.conf" > "$work/unbound.log" 2>&1 &
pids+=($!)
src=.
if [ "${BUILD:-}" = pure ]; then  # a copy of the sources without the compiled modules
    src=$work/src
    mkdir -p "$src" && cp -r dnsproxy "$src/" && rm -f "$src"/dnsproxy/*.so
fi
# -P: the working directory does not come first on the path; PYTHONPATH decides.
echo "build: $(PYTHONPATH=$src "$PY" -P -c 'import dnsproxy; print(dnsproxy.compiled())')"
PYTHONPATH=$src valgrind --tool=callgrind --callgrind-out-file="$work/cg.%p" \
    "$PY" -P -m dnsproxy --config "$work/dnsproxy.yaml" > "$work/dnsproxy.log" 2>&1 &
vg=$!
pids+=($vg)
started=no
for _ in $(seq 1 240); do
    dig +short +time=1 +tries=1 -p "$dp_port" @127.0.0.1 "warm.$tag.bench.test" > /dev/null 2>&1 && { started=yes; break; }
    kill -0 "$vg" 2>/dev/null || break
    sleep 0.5
done
if [ $started = no ]; then
    echo "dnsproxy did not answer; its log:" >&2
    tail -20 "$work/dnsproxy.log" >&2
    exit 1
fi
callgrind_control --zero "$vg" > /dev/null 2>&1
dnsperf -s 127.0.0.1 -p "$dp_port" -d "$work/names.txt" -n 1 -Q "$QPS" -c 1 -q 200 -t 10 > "$work/dnsperf.txt"
callgrind_control --dump=miss "$vg" > /dev/null 2>&1
callgrind_control --zero "$vg" > /dev/null 2>&1
dnsperf -s 127.0.0.1 -p "$dp_port" -d "$work/names.txt" -n 5 -Q "$HIT_QPS" -c 1 -q 200 -t 10 > "$work/dnsperf-hit.txt"
callgrind_control --dump=hit "$vg" > /dev/null 2>&1
report() {  # dnsperf output, callgrind dump, label
    local completed instructions
    completed=$(awk '/Queries completed/ {print $3}' "$1")
    instructions=$(awk '/^(summary|totals):/ {print $2; exit}' "$2")
    echo "$(grep -E 'Queries (completed|lost)' "$1" | tr -s ' ' | tr '\n' ' ')"
    echo "instructions per $3: $((instructions / completed)) ($instructions for $completed queries)"
}
report "$work/dnsperf.txt" "$(ls "$work"/cg.*.1)" miss
report "$work/dnsperf-hit.txt" "$(ls "$work"/cg.*.2)" hit
if [ -n "${KEEP:-}" ]; then
    mkdir -p "$KEEP"
    cp "$(ls "$work"/cg.*.1)" "$KEEP/miss.out"
    cp "$(ls "$work"/cg.*.2)" "$KEEP/hit.out"
fi
