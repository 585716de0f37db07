#!/usr/bin/env bash
# Adds nvImageCodec (and the nvJPEG it loads) for the GPU machine's Python 3.12 to .device/whl, after
# ../shared/device/pack.sh, slimmed to fit the device carry limit (64 MiB in all): the wheel ships its
# module for seven Pythons and TIFF, JPEG 2000 and OpenCV extensions that mmembed never loads (32 MB as
# published); this keeps the cp312 module and the JPEG extensions.
# Usage: bash benchmarks/pack_nvimgcodec.sh [cu13|cu12]   (match torch.version.cuda on the device; default cu13)
set -euo pipefail
cuda=${1:-cu13}
root=$(git rev-parse --show-toplevel)
mkdir -p "$root/.device/whl"
tmp=$(mktemp -d)
plat=(--only-binary=:all: --python-version 3.12 --implementation cp
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
nvjpeg=$([ "$cuda" = cu13 ] && echo nvidia-nvjpeg || echo nvidia-nvjpeg-cu12)
python3 -m pip download -q --no-deps "${plat[@]}" -d "$tmp" "nvidia-nvimgcodec-$cuda>=0.9,<1" "$nvjpeg"
mkdir "$tmp/x"
(cd "$tmp/x" && python3 -m zipfile -e "$tmp"/nvidia_nvimgcodec_*.whl . \
  && find nvidia/nvimgcodec -name 'nvimgcodec_impl.cpython-*.so' ! -name '*cpython-312-*' -delete \
  && rm -rf nvidia/nvimgcodec/tools nvidia/nvimgcodec/include \
  && rm -f nvidia/nvimgcodec/extensions/lib{tiff,nvtiff,nvjpeg2k,opencv}_ext.so* \
  && python3 -m zipfile -c "$root/.device/whl/$(basename "$tmp"/nvidia_nvimgcodec_*.whl)" nvidia nvidia_nvimgcodec_*.dist-info)
cp "$tmp"/nvidia_nvjpeg*.whl "$root/.device/whl/"
rm -rf "$tmp"
du -sh "$root/.device/whl"/nvidia_* "$root/.device"
