#!/usr/bin/env bash
# Create .venv for this clone. The heavy dependencies (torch, transformers, diffusers ...) are installed once into
# a cache keyed on the hash of requirements.lock and shared by every clone on this machine; .venv itself is a
# light virtualenv that sees the cache through a .pth file and holds an editable install of this clone.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
CACHE_ROOT=${FORGELAB_VENV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/forgelab}
hash=$(sha256sum requirements.lock | cut -c1-16)
deps="$CACHE_ROOT/deps-$hash"

mkdir -p "$CACHE_ROOT"
exec 9>"$CACHE_ROOT/.lock"
flock 9  # two clones setting up at once: the second waits and reuses the first one's install
if [ ! -f "$deps/.complete" ]; then
  echo "make_env: installing dependencies into $deps (once per requirements.lock; several minutes)"
  # A venv is not relocatable, so it is built at its final path; `.complete` is written last, and a set without
  # it (an interrupted install) is rebuilt from scratch.
  rm -rf "$deps"
  "$PYTHON" -m venv "$deps"
  "$deps/bin/python" -m pip install --quiet --no-input -r requirements.lock
  touch "$deps/.complete"
  # keep the two most recent dependency sets
  ls -dt "$CACHE_ROOT"/deps-* 2>/dev/null | tail -n +3 | xargs -r rm -rf
fi

site_of() { "$1/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }
if [ ! -f .venv/.forgelab-deps ] || [ "$(cat .venv/.forgelab-deps)" != "$deps" ] || [ ! -x .venv/bin/python ]; then
  rm -rf .venv
  "$PYTHON" -m venv .venv
  echo "import site; site.addsitedir('$(site_of "$deps")')" > "$(site_of .venv)/_forgelab_deps.pth"
  # console scripts of the shared dependencies (pytest, ruff, wandb ...), re-pointed at this venv's python
  for script in "$deps"/bin/*; do
    name=$(basename "$script")
    case "$name" in python*|pip*|activate*|Activate*) continue ;; esac
    if head -n1 "$script" | grep -q "^#!.*python"; then
      { echo "#!$PWD/.venv/bin/python"; tail -n +2 "$script"; } > ".venv/bin/$name"
      chmod +x ".venv/bin/$name"
    elif [ -x "$script" ] && [ ! -e ".venv/bin/$name" ]; then
      ln -s "$script" ".venv/bin/$name"  # compiled tools (ruff)
    fi
  done
  echo "$deps" > .venv/.forgelab-deps
fi
# a forgelab.egg-info left in the clone by an old setuptools would shadow the install's entry points (cwd is on
# sys.path), hiding commands such as `forgelab sweep`
rm -rf forgelab.egg-info
.venv/bin/python -m pip install --quiet --no-input --no-deps --no-build-isolation -e . >/dev/null
echo "make_env: .venv ready ($(.venv/bin/python -c 'import torch, lightning; print("torch", torch.__version__, "lightning", lightning.__version__)'))"
