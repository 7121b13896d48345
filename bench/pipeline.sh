#!/usr/bin/env bash
# The embedded pipeline's figures: throughput and the share of time in encryption on generated
# orders (the run report measures both), and the peak memory of a run over a 100,000-order
# generated bulk export (GNU time's maximum resident set size).
#
# Knobs (environment): ORDERS (10000) for the throughput run, BIG (100000) for the memory run,
# SKIP_BUILD=1 uses the release binary already built, TMPDIR picks where the data dirs live.
set -euo pipefail

ORDERS=${ORDERS:-10000}
BIG=${BIG:-100000}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/rxflow-target}
BIN="$CARGO_TARGET_DIR/release/rxflow"

if [ "${SKIP_BUILD:-0}" != 1 ]; then
  (cd "$ROOT" && cargo build --release -p rxflow)
fi
if [ ! -x /usr/bin/time ]; then
  echo "GNU time is missing; installing it with apt-get" >&2
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get install -y -qq time >/dev/null || { $SUDO apt-get update >/dev/null && $SUDO apt-get install -y -qq time >/dev/null; }
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "== demo: $ORDERS generated orders through every step (verified and dispensed)"
"$BIN" demo --orders "$ORDERS" --data-dir "$work/demo" --json > "$work/demo.json"
python3 - "$work/demo.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
e = r["encryption"]
print(f"orders: {r['orders_total']}  elapsed: {r['elapsed_seconds']:.2f} s  orders/s: {r['orders_per_second']:.0f}")
print(f"encryption: {e['seals']} seals + {e['opens']} opens in {e['seconds']:.3f} s = {e['share_percent']:.2f}% of the run")
print(f"audit events: {r['audit_events']}  verified: {r['audit_verified']}")
PY

echo "== run --replay over a generated bulk export of $BIG orders: peak memory"
"$BIN" generate --orders "$BIG" --out "$work/export" 2>/dev/null
/usr/bin/time -v "$BIN" run --input "$work/export" --replay --verify-as bench-pharmacist \
  --data-dir "$work/big" > "$work/big.txt" 2> "$work/big.time"
# (the human report: --json would keep one entry per order in memory for the report)
python3 - "$work/big.txt" "$work/big.time" <<'PY'
import re, sys
r = open(sys.argv[1]).read()
t = open(sys.argv[2]).read()
rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", t).group(1))
print(re.search(r"\d+ orders in .*", r).group(0))
print(re.search(r"encryption: .*", r).group(0))
print(f"peak RSS (max resident set): {rss/1024:.1f} MiB")
PY
