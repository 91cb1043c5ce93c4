#!/usr/bin/env bash
# Refresh the JavaScript the circuit viewer inlines into its pages (circuits/io/viewer/vendor/):
# graphology (the graph model) and sigma (WebGL drawing), pinned below, fetched with `npm pack`
# from the npm registry, with their licences. Bump a version here, run this, and commit the result.
#
# sigma 3 over 4: chosen by measured speed on the smollm2-135m 12k-edge circuit in headless
# Chromium (sigma 3 vs Cytoscape.js 3.35: first frame ~2x faster, slider ~3x faster); sigma 4 is
# a rewrite whose UMD bundle is twice the size.
set -euo pipefail
GRAPHOLOGY=0.26.0
SIGMA=3.0.3
cd "$(dirname "$0")/.."
dest=circuits/io/viewer/vendor
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "graphology@$GRAPHOLOGY" "sigma@$SIGMA" >/dev/null)
mkdir -p "$work/g" "$work/s" "$dest"
tar xzf "$work/graphology-$GRAPHOLOGY.tgz" -C "$work/g"
tar xzf "$work/sigma-$SIGMA.tgz" -C "$work/s"
cp "$work/g/package/dist/graphology.umd.min.js" "$dest/graphology.umd.min.js"
cp "$work/g/package/LICENSE.txt" "$dest/LICENSE-graphology.txt"
cp "$work/s/package/dist/sigma.min.js" "$dest/sigma.min.js"
cp "$work/s/package/LICENSE.txt" "$dest/LICENSE-sigma.txt"
printf 'graphology %s (npm, MIT)\nsigma %s (npm, MIT)\n' "$GRAPHOLOGY" "$SIGMA" > "$dest/VERSIONS"
echo "vendored graphology $GRAPHOLOGY and sigma $SIGMA into $dest"
