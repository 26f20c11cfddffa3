#!/usr/bin/env bash
# On the GPU machine (no network): put the catalog GGUFs, carried there in <= 60 MiB chunks by
# earlier calls into /tmp/scratch/<name>/pNN, into VENGINE_CACHE and check their sha256 against
# vengine's catalog; install gguf (carried as a wheel in .whl/) beside. Then run "$@".
#   split -b 60M -d -a 2 ~/.cache/vengine/models/qwen2.5-coder-1.5b.gguf .whl/c15/p   # here
#   one device call per chunk: mkdir -p /tmp/scratch/c15 && cp .whl/c15/p03 /tmp/scratch/c15/
#   then: bash benchmarks/device_models.sh vengine eval --model qwen2.5-coder-1.5b ...
set -euo pipefail
export VENGINE_CACHE=${VENGINE_CACHE:-/tmp/vc} PYTHONPATH=/tmp/site:$PWD
mkdir -p "$VENGINE_CACHE/models"
[ -d /tmp/site/gguf ] || pip install -q --no-deps --target /tmp/site .whl/gguf-*.whl
for pair in c05:qwen2.5-coder-0.5b c15:qwen2.5-coder-1.5b g3:gemma3-270m; do
  dir=/tmp/scratch/${pair%%:*} name=${pair#*:}
  out=$VENGINE_CACHE/models/$name.gguf
  if [ -d "$dir" ] && [ ! -f "$out" ]; then
    cat "$dir"/p* > "$out.part"
    want=$(python -c "from vengine.models.catalog import CATALOG; print(CATALOG['$name'].sha256)")
    got=$(sha256sum "$out.part" | cut -d' ' -f1)
    [ "$got" = "$want" ] || { echo "$name: sha256 $got, want $want" >&2; exit 2; }
    mv "$out.part" "$out"
  fi
done
"$@"
