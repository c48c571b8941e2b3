#!/usr/bin/env bash
# Run here, before a GPU session: the pure-Python wheels the GPU machine lacks (Python 3.12 there;
# see ../shared/TOOLCHAIN.md), into .whl/ (git-ignored; name it in the device call's carry).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform any -d .whl \
    "lark>=1.1" "jax-triton==0.4.1"
ls -l .whl
