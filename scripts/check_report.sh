#!/usr/bin/env bash
# Look at a workflow report in a real browser: headless Chromium (Debian package `chromium`) renders the
# report's front page and the pages it shows in frames (the summary and the QC gallery, from the results
# folder), saves screenshots, and checks that the rendered front page holds the summary table.
#
#   snakemake --report report.html            # after a run
#   scripts/check_report.sh report.html OUT [results/demo]
#
# Writes OUT/front.png, OUT/summary.png, OUT/qc_gallery.png and OUT/front_dom.html (the page after its
# scripts ran); exits 1 when the table is missing from the rendered front page. Look at the screenshots.
set -euo pipefail
report="$(realpath "$1")"
out="$2"
results="$(realpath "${3:-results/demo}")"
browser="$(command -v chromium || command -v chromium-browser || true)"
if [ -z "$browser" ]; then
    echo "check_report: no chromium on PATH; install it (Debian: apt-get install chromium)" >&2
    exit 2
fi
mkdir -p "$out"
flags=(--headless --no-sandbox --disable-gpu --disable-background-networking --disable-dev-shm-usage
    --hide-scrollbars --no-first-run --virtual-time-budget=10000)

shot() { # shot FILE PNG WIDTH HEIGHT
    "$browser" "${flags[@]}" --window-size="$3,$4" --screenshot="$2" "file://$1" 2>/dev/null
    echo "check_report: $2 ($(du -h "$2" | cut -f1))"
}

shot "$report" "$out/front.png" 1500 1400
shot "$results/report/summary.html" "$out/summary.png" 1200 500
shot "$results/report/qc_gallery.html" "$out/qc_gallery.png" 1400 2000
"$browser" "${flags[@]}" --dump-dom "file://$report" 2>/dev/null > "$out/front_dom.html"
echo "check_report: $report is $(du -h "$report" | cut -f1)"
if ! grep -q "task (main metric, test bags)" "$out/front_dom.html"; then
    echo "check_report: the rendered front page has no summary table" >&2
    exit 1
fi
echo "check_report: the rendered front page holds the summary table ($(grep -o '<td>' "$out/front_dom.html" | wc -l) cells)"
