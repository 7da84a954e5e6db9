#!/usr/bin/env bash
# Create the virtual environment of a peer tool that bench/ptq.py compares against.
#
#   bench/peers/setup.sh llmcompressor [DIR]     # DIR defaults to ~/.cache/compress/peers/llmcompressor
#
# The peer lives in its own venv (it needs transformers 5.x; our suite pins 4.57.6) and is run
# as a subprocess by bench/peers/llmcompressor.py. The CPU torch wheel comes from the same place as
# our Makefile's: pip's configured wheel folder / local indexes (pip.conf find-links /opt/wheels
# holds torch-2.13.0+cpu); asking for the exact local version `+cpu` keeps pip off the CUDA build.
# Idempotent: does nothing when DIR already holds the pinned versions.
set -euo pipefail

PYTHON=${PYTHON:-python3}
peer=${1:-}
case "$peer" in
  llmcompressor)
    pins=(torch==2.13.0+cpu llmcompressor==0.14.0.1)
    check='import torch, llmcompressor, compressed_tensors, datasets, safetensors
assert torch.__version__ == "2.13.0+cpu", torch.__version__
assert llmcompressor.__version__ == "0.14.0.1", llmcompressor.__version__'
    ;;
  *)
    echo "usage: $0 llmcompressor [DIR]" >&2
    exit 2
    ;;
esac
dir=${2:-$HOME/.cache/compress/peers/$peer}
stamp="$dir/.installed-$peer"
want="${pins[*]}"

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" && -x "$dir/bin/python" ]] \
   && "$dir/bin/python" -c "$check" >/dev/null 2>&1; then
  echo "$peer: already installed in $dir ($want)"
  exit 0
fi

echo "$peer: installing $want into $dir"
[[ -x "$dir/bin/python" ]] || "$PYTHON" -m venv "$dir"
find_links=()
[[ -d /opt/wheels ]] && find_links=(--find-links /opt/wheels)   # same wheel folder as pip.conf; harmless if repeated
"$dir/bin/python" -m pip install -q --disable-pip-version-check "${find_links[@]}" "${pins[@]}"
"$dir/bin/python" -c "$check"
echo "$want" > "$stamp"
echo "$peer: installed in $dir"
"$dir/bin/python" -c 'import torch, llmcompressor, transformers, compressed_tensors
print("  torch", torch.__version__, "| llmcompressor", llmcompressor.__version__,
      "| transformers", transformers.__version__, "| compressed-tensors", compressed_tensors.__version__)'
