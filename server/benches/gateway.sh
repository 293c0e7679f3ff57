#!/usr/bin/env bash
# Gateway throughput and latency: requests/s, p50 and p99 at 1, 16 and 64
# connections, through the gateway, through a bare forwarding proxy (the second
# HTTP exchange alone: the floor under any gateway on this stack) and directly to
# the mock upstream, on SQLite and (when TEST_DATABASE_URL is set) PostgreSQL;
# then the latency at a fixed rate (RATE requests/s, 2000 by default) with the
# gateway's added time.
# Each wrk run also prints the stack process's CPU time and context switches per
# request (from /proc, all its threads; PostgreSQL's own processes are not in
# it): steadier than requests/s on a shared virtual machine, where a thread that
# sleeps and is woken costs tens of microseconds.
#
#   server/benches/gateway.sh            # DURATION=10s per run by default
#   DURATION=30s RATE=2000 PROFILE=release server/benches/gateway.sh
#
# Load comes from wrk (Debian's `wrk` package) in its own process; the stack is
# `server/benches/gateway.rs` (mock upstream + real router + fresh database),
# built with the dev profile unless PROFILE says otherwise. Debug numbers show the
# shape, not what a release binary does.
set -euo pipefail
cd "$(dirname "$0")/../.."

DURATION=${DURATION:-10s}
RATE=${RATE:-2000}
PROFILE=${PROFILE:-dev}
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install wrk" >&2; exit 1; }

# Both bench targets, built with $PROFILE in one cargo call (one call, so that a
# release build whose embedded site is missing recompiles the server once, not
# once per target); prints "NAME PATH" per executable.
build_benches() {
  cargo build -q -p server --bench gateway --bench gateway_rate --profile "$PROFILE" --message-format=json \
    | python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        print(m["target"]["name"], m["executable"])'
}
built=$(build_benches)
bin=$(awk '$1 == "gateway" {print $2}' <<< "$built")
rate_bin=$(awk '$1 == "gateway_rate" {print $2}' <<< "$built")
[ -x "$bin" ] && [ -x "$rate_bin" ] || { echo "could not build the benchmark stack" >&2; exit 1; }

work=$(mktemp -d)
stack_pid=
cleanup() {
  if [ -n "$stack_pid" ]; then kill "$stack_pid" 2>/dev/null || true; wait "$stack_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

body='{"model":"bench","messages":[{"role":"user","content":"Say hello in one short sentence."}],"max_tokens":16}'

# The stack process's CPU time (clock ticks) and context switches so far, summed
# over its threads: "ticks switches".
stack_usage() {
  local ticks switches
  ticks=$(sed 's/.*) //' "/proc/$stack_pid/stat" | awk '{print $12 + $13}')
  switches=$(cat /proc/"$stack_pid"/task/*/status 2>/dev/null \
    | awk '/^(non)?voluntary_ctxt_switches/ {n += $2} END {print n}')
  echo "$ticks $switches"
}

# One wrk run: prints "requests/s p50 p99 cpu/req switches/req", the last two
# the stack process's CPU time (µs) and context switches per request.
measure() {
  local url=$1 key=$2 connections=$3 threads=$(( $3 < 2 ? $3 : 2 ))
  cat > "$work/post.lua" <<LUA
wrk.method = "POST"
wrk.body = '$body'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $key"
LUA
  local before; before=$(stack_usage)
  wrk -t"$threads" -c"$connections" -d"$DURATION" --latency -s "$work/post.lua" "$url/chat/completions" > "$work/wrk.out"
  local after; after=$(stack_usage)
  local non2xx; non2xx=$(awk '/Non-2xx/ {print $NF}' "$work/wrk.out")
  [ -z "$non2xx" ] || echo "  (warning: $non2xx non-2xx answers)" >&2
  awk -v before="$before" -v after="$after" -v hz="$(getconf CLK_TCK)" '
    /requests in/ {n=$1}
    /Requests\/sec/ {rps=$2}
    /^ +50%/ {p50=$2}
    /^ +99%/ {p99=$2}
    END {
      split(before, b, " "); split(after, a, " ")
      printf "%10s %10s %10s %10.0f %10.2f\n", rps, p50, p99,
        (a[1] - b[1]) * 1e6 / hz / n, (a[2] - b[2]) / n
    }' "$work/wrk.out"
}

run_backend() {
  local backend=$1
  BENCH_BACKEND=$backend "$bin" > "$work/stack.out" 2> "$work/stack.err" &
  stack_pid=$!
  for _ in $(seq 1 100); do grep -q '^KEY=' "$work/stack.out" 2>/dev/null && break; sleep 0.1; done
  grep -q '^KEY=' "$work/stack.out" || { cat "$work/stack.err" >&2; exit 1; }
  local gateway mock proxy key
  gateway=$(sed -n 's/^GATEWAY=//p' "$work/stack.out")
  mock=$(sed -n 's/^MOCK=//p' "$work/stack.out")
  proxy=$(sed -n 's/^PROXY=//p' "$work/stack.out")
  key=$(sed -n 's/^KEY=//p' "$work/stack.out")
  DURATION=2s measure "$gateway" "$key" 16 > /dev/null   # warm-up: pools, caches
  printf '%-9s %-8s %5s %10s %10s %10s %10s %10s\n' backend target conns 'req/s' p50 p99 'cpu µs/req' 'switch/req'
  local shares=() row through direct g d
  for c in 1 16 64; do
    through=$(measure "$gateway" "$key" "$c")
    printf '%-9s %-8s %5s %s\n' "$backend" gateway "$c" "$through"
    printf '%-9s %-8s %5s %s\n' "$backend" proxy "$c" "$(measure "$proxy" none "$c")"
    direct=$(measure "$mock" none "$c")
    printf '%-9s %-8s %5s %s\n' "$backend" direct "$c" "$direct"
    read -r g _ <<< "$through"; read -r d _ <<< "$direct"
    row=$(awk -v g="$g" -v d="$d" 'BEGIN {printf "%.1f%%", 100 * g / d}')
    shares+=("$c: $row")
  done
  echo "gateway req/s as a share of the mock's, by connections: ${shares[*]}"
  # The runs above leave the page cache full of the database's dirty pages; the
  # kernel writing them back would stall the fixed-rate run's commits on the
  # disk. Flushed first, each measurement starts from a quiet disk.
  sync
  echo "fixed rate: $RATE requests/s for ${DURATION%s} s (latencies in µs, p50/p99)"
  printf '%-9s %-8s %7s %7s %6s %19s %13s\n' backend target sent 'req/s' non200 'client p50/p99' 'added p50/p99'
  printf '%-9s %-8s %s\n' "$backend" gateway "$("$rate_bin" "$gateway" "$key" "$RATE" "${DURATION%s}")"
  printf '%-9s %-8s %s\n' "$backend" proxy "$("$rate_bin" "$proxy" none "$RATE" "${DURATION%s}")"
  printf '%-9s %-8s %s\n' "$backend" direct "$("$rate_bin" "$mock" none "$RATE" "${DURATION%s}")"
  kill "$stack_pid"; wait "$stack_pid" 2>/dev/null || true; stack_pid=
  sed -n 's/^served; /  books after the runs: /p' "$work/stack.err"
  sed -n 's/^tollgate_settlements_total/  settlements/p' "$work/stack.err"
}

run_backend sqlite
if [ -n "${TEST_DATABASE_URL:-}" ]; then
  run_backend postgres
else
  echo "TEST_DATABASE_URL is unset: PostgreSQL skipped" >&2
fi
