#!/usr/bin/env bash
# Render a run's report.html in headless Chromium and save a full-page screenshot.
#   scripts/check_report_browser.sh runs/demo/train/omnifuse [out.png]
# Needs Debian's chromium (apt-get install chromium). Exits non-zero if nothing was rendered.
set -euo pipefail
run_dir=${1:?usage: $0 RUN_DIR [OUT.png]}
out=${2:-$run_dir/report.png}
browser=$(command -v chromium || command -v chromium-browser || true)
[ -n "$browser" ] || { echo "chromium not found: apt-get install chromium" >&2; exit 2; }
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
"$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --user-data-dir="$profile" --window-size=1200,3000 --screenshot="$out" \
  "file://$(cd "$run_dir" && pwd)/report.html" >/dev/null 2>&1
[ -s "$out" ] && echo "rendered $out ($(stat -c %s "$out") bytes)"
