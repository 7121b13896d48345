#!/usr/bin/env bash
# Fixed-rate intake load against a local `rxflow serve`.
#
# Builds rxflow (release), starts `rxflow serve` on a fresh temporary data dir on 127.0.0.1,
# mints a prescriber token with `rxflow token`, registers the prescriber once (a Bundle with the
# Practitioner), then POSTs a new FHIR MedicationRequest per request to /prescriptions at RATE
# requests/s for DURATION seconds with wrk (a Lua script paces each thread on a wall-clock
# schedule and makes every order unique). Prints requests/s, p50/p99 latency, errors and the
# server's peak RSS (VmHWM), then stops the server with SIGTERM and reports how long it took to
# drain the in-process pipeline and seal the trail (the server seals once more when it stops).
#
# Targets: p99 <= 10 ms at 1,000 requests/s; peak RSS <= 64 MB.
#
# Knobs (environment): RATE (1000), DURATION (30), CONNS (16), THREADS (2), PORT (18080),
# RUST_LOG (info; the server's logs go to a file in the temp dir), KEEP=1 keeps the temp dir,
# SKIP_BUILD=1 uses the release binary already built, TMPDIR picks where the data dir lives
# (TMPDIR=/dev/shm takes the disk's fsync out of the figures).
set -euo pipefail

RATE=${RATE:-1000}
DURATION=${DURATION:-30}
CONNS=${CONNS:-16}
THREADS=${THREADS:-2}
PORT=${PORT:-18080}
HOST=127.0.0.1
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/rxflow-target}
BIN="$CARGO_TARGET_DIR/release/rxflow"

if ! command -v wrk >/dev/null 2>&1; then
    echo "wrk is missing; installing it with apt-get" >&2
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get install -y wrk >/dev/null || { $SUDO apt-get update >/dev/null && $SUDO apt-get install -y wrk >/dev/null; }
fi

if [ "${SKIP_BUILD:-0}" = 1 ] && [ -x "$BIN" ]; then
    echo "using the existing $BIN" >&2
else
    echo "building rxflow (release)..." >&2
    (cd "$ROOT" && cargo build --release -p rxflow --quiet)
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/rxflow-load.XXXXXX")
DATA="$WORK/data"
SERVER_PID=""
cleanup() {
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    if [ "${KEEP:-0}" = 1 ]; then echo "kept $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

NPI=1234567893
TOKEN=$("$BIN" token --role prescriber --sub dr-load --npi "$NPI" --ttl-minutes 30 --data-dir "$DATA")

RUST_LOG=${RUST_LOG:-info} "$BIN" serve --addr "$HOST:$PORT" --data-dir "$DATA" >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 1 100); do
    curl -fsS "http://$HOST:$PORT/healthz" >/dev/null 2>&1 && break
    kill -0 "$SERVER_PID" 2>/dev/null || { echo "the server did not start:" >&2; cat "$WORK/server.log" >&2; exit 1; }
    sleep 0.1
done

# Register the prescriber (NPI, DEA) once, so every order validates against the directory.
curl -fsS -o /dev/null -X POST "http://$HOST:$PORT/prescriptions" \
    -H "Authorization: Bearer $TOKEN" -H "Content-Type: application/fhir+json" \
    --data-binary @- <<JSON
{"resourceType": "Bundle", "type": "collection", "entry": [
  {"fullUrl": "urn:uuid:dr-load", "resource": {"resourceType": "Practitioner",
    "identifier": [{"system": "http://hl7.org/fhir/sid/us-npi", "value": "$NPI"},
                   {"system": "http://terminology.hl7.org/NamingSystem/DEANumber", "value": "AP5836727"}],
    "name": [{"family": "Load", "given": ["Pat"]}]}},
  {"resource": {"resourceType": "MedicationRequest", "id": "load-warmup", "status": "active", "intent": "order",
    "medicationCodeableConcept": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "314076"}]},
    "subject": {"reference": "Patient/pat-warmup"}, "requester": {"reference": "urn:uuid:dr-load"},
    "dispenseRequest": {"quantity": {"value": 30, "unit": "tablet"},
      "expectedSupplyDuration": {"value": 30, "unit": "days", "code": "d"}}}}
]}
JSON

cat >"$WORK/load.lua" <<'LUA'
-- Paced POSTs of unique MedicationRequests: each thread sends on a wall-clock schedule of
-- rate/threads requests per second (wrk calls delay() before each next request of a connection).
local ffi = require("ffi")
ffi.cdef[[
  typedef struct { long tv_sec; long tv_usec; } rx_timeval;
  int gettimeofday(rx_timeval *tv, void *tz);
]]
local tv = ffi.new("rx_timeval")
local function now_ms()
  ffi.C.gettimeofday(tv, nil)
  return tonumber(tv.tv_sec) * 1000 + tonumber(tv.tv_usec) / 1000
end

local counter = 0
function setup(thread)
  counter = counter + 1
  thread:set("tid", counter)
end

local template = [[{"resourceType": "MedicationRequest", "id": "%s", "status": "active", "intent": "order",
 "medicationCodeableConcept": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm",
   "code": "314076", "display": "lisinopril 10 MG Oral Tablet"}]},
 "subject": {"reference": "Patient/%s"},
 "requester": {"reference": "Practitioner?identifier=http://hl7.org/fhir/sid/us-npi|1234567893"},
 "dosageInstruction": [{"text": "1 tablet daily", "timing": {"repeat": {"frequency": 1, "period": 1, "periodUnit": "d"}},
   "doseAndRate": [{"doseQuantity": {"value": 1, "unit": "tablet"}}]}],
 "dispenseRequest": {"numberOfRepeatsAllowed": 0, "quantity": {"value": 30, "unit": "tablet"},
   "expectedSupplyDuration": {"value": 30, "unit": "days", "code": "d"}}}]]

function init(args)
  local rate = tonumber(args[1]) / tonumber(args[2])
  interval = 1000 / rate
  start = nil
  sent = 0
  n = 0
  wrk.headers["Authorization"] = "Bearer " .. args[3]
  wrk.headers["Content-Type"] = "application/fhir+json"
end

function delay()
  local now = now_ms()
  if start == nil then start = now end
  sent = sent + 1
  local d = start + sent * interval - now
  if d < 0 then return 0 end
  return d
end

function request()
  n = n + 1
  local id = string.format("load-%d-%d-%d", tid, n, os.time())
  local patient = string.format("pat-load-%d", (n * 7 + tid) % 2000)
  return wrk.format("POST", "/prescriptions", nil, string.format(template, id, patient))
end

function done(summary, latency, requests)
  local secs = summary.duration / 1e6
  local e = summary.errors
  io.write(string.format("RESULT requests=%d seconds=%.1f rps=%.0f p50_ms=%.2f p99_ms=%.2f max_ms=%.2f non2xx=%d socket_errors=%d\n",
    summary.requests, secs, summary.requests / secs,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, latency.max / 1000,
    e.status, e.connect + e.read + e.write + e.timeout))
end
LUA

echo "load: $RATE requests/s for ${DURATION}s, $CONNS connections, $THREADS threads, against $HOST:$PORT" >&2
wrk -t "$THREADS" -c "$CONNS" -d "${DURATION}s" --timeout 2s --latency -s "$WORK/load.lua" \
    "http://$HOST:$PORT" -- "$RATE" "$THREADS" "$TOKEN" | tee "$WORK/wrk.out" >&2

HWM_KB=$(awk '/VmHWM/ {print $2}' "/proc/$SERVER_PID/status")
RSS_KB=$(awk '/VmRSS/ {print $2}' "/proc/$SERVER_PID/status")
T0=$(date +%s.%N)
kill -TERM "$SERVER_PID"
wait "$SERVER_PID" || true
T1=$(date +%s.%N)
SERVER_PID=""

RESULT=$(grep '^RESULT' "$WORK/wrk.out" || true)
get() { echo "$RESULT" | tr ' ' '\n' | awk -F= -v k="$1" '$1 == k {print $2}'; }
echo
echo "== rxflow intake load ($RATE requests/s target, ${DURATION}s) =="
printf 'requests/s      %s  (%s requests, %s non-2xx, %s socket errors)\n' "$(get rps)" "$(get requests)" "$(get non2xx)" "$(get socket_errors)"
printf 'latency p50     %s ms\n' "$(get p50_ms)"
printf 'latency p99     %s ms   (target <= 10 ms; max %s ms)\n' "$(get p99_ms)" "$(get max_ms)"
printf 'peak RSS        %s MiB  (VmHWM; target <= 64 MB; RSS at end %s MiB)\n' "$((HWM_KB / 1024))" "$((RSS_KB / 1024))"
printf 'drain on TERM   %.1f s (pipeline finishing accepted orders, then the audit seal at stop)\n' "$(echo "$T1 - $T0" | bc 2>/dev/null || echo 0)"
grep -c '"pipeline step refused' "$WORK/server.log" 2>/dev/null | xargs printf 'pipeline refusals in log: %s\n' || true
