#!/usr/bin/env bash
# Build what benchmarks/gpu/bench.py needs on a lent GPU machine, under .gpu_carry/
# (ignored by git): the model's config and tokenizer without its weights (the 87 MB
# safetensors is over the device tool's carry limit; bench.py makes random weights
# there: speed does not depend on them) and wheels of the worker's Python packages
# that the GPU image lacks (pydantic and its needs). Run here, in the repo root:
#     bash benchmarks/gpu/prepare.sh
# then, on the device:  carry [".gpu_carry"], command: bash benchmarks/gpu/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-/work/main/.venv/bin/python}
grep -qx '/.gpu_carry/' .git/info/exclude 2>/dev/null || echo '/.gpu_carry/' >> "$(git rev-parse --git-path info/exclude)"
rm -rf .gpu_carry && mkdir -p .gpu_carry/model .gpu_carry/whl
MODEL=$(PYTHONPATH=$PWD "$PY" -c 'from fleet.worker.handlers.text_embed import default_model_path as d; print(d())')
(cd "$MODEL" && find . -type f ! -name '*.safetensors' ! -name '*.bin' ! -name 'README.md' ! -name 'data_config.json' \
    -exec cp --parents {} "$OLDPWD/.gpu_carry/model/" \;)
for pkg in pydantic pydantic_core annotated-types typing-inspection; do
    version=$("$PY" -m pip show "$pkg" 2>/dev/null | sed -n 's/^Version: //p')
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .gpu_carry/whl "$pkg==$version"
done
du -sh .gpu_carry
