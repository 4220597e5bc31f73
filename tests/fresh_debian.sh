#!/usr/bin/env bash
# Checks README's "Set up" on a fresh Debian 12: a minimal bookworm chroot (debootstrap minbase) with only
# git and python3 installed, a fresh clone of the repository, `bash setup.sh` as README writes it, then
# README's cheap commands, found by their `<!-- check: NAME -->` markers in README.md at the clone's latest
# commit (`git pull` before each step), run as written from a fresh login shell (no venv, no `python`):
#
#   setup         the `demo` block up to its `&&`: `bash setup.sh`
#   prepare       the `prepare-demo` block (RAW: runs/fresh_raw)
#   preprocess    README's `jobs.preprocess --modality image` line on the demo's MNIST train split (28 px)
#   print-config  the `print-config` block (OUT: that folder); its training line gets --max-steps 20
#   ray-submit    the `local-submit` block (local head, `ray job submit`, `ray stop`); the data it names
#                 is made first with `jobs.demo --modalities <that modality>` when missing
#   collect       the `tests` block's command with --collect-only (imports every test module)
#   demo          the `demo` block as written, from scratch; only with --demo (~4 min)
#
# Needs root (debootstrap, chroot, mounts) and the Debian mirror + PyPI. Not part of the pytest suite.
#
#   bash tests/fresh_debian.sh [REPO] [--chroot DIR] [--steps a,b,...] [--demo] [--fresh] [--no-lock]
#
# REPO defaults to this script's repository; its sibling ../shared is copied beside the clone.
# The chroot (default /work/chroot) and its clone are reused when present (setup.sh then only re-checks,
# seconds); --fresh rebuilds both (debootstrap + git/python3 ~1.5 min, setup.sh ~4.5 min: it downloads
# torch's CUDA wheels). CPU-heavy steps run under `flock $CPU_LOCK` (default /tmp/cpu.lock, when that file
# exists; --no-lock to skip). Logs go to $LOG_DIR (default /tmp/fresh_debian), one file per step. Mounts
# are made on entry and undone on exit.
set -uo pipefail

REPO=""; C=/work/chroot; STEPS="setup,prepare,preprocess,print-config,ray-submit,collect"; FRESH=0; DEMO=0
LOCK="${CPU_LOCK:-/tmp/cpu.lock}"; LOG_DIR="${LOG_DIR:-/tmp/fresh_debian}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
while [ $# -gt 0 ]; do
  case "$1" in
    --chroot) C="$2"; shift 2 ;;
    --steps) STEPS="$2"; shift 2 ;;
    --demo) DEMO=1; shift ;;
    --fresh) FRESH=1; shift ;;
    --no-lock) LOCK=""; shift ;;
    -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {print}' "$0"; exit 0 ;;
    -*) echo "unknown option $1" >&2; exit 2 ;;
    *) REPO="$1"; shift ;;
  esac
done
[ "$(id -u)" -eq 0 ] || { echo "fresh_debian: needs root (debootstrap, chroot, mount)" >&2; exit 2; }
REPO="$(cd "${REPO:-$(dirname "$0")/..}" && pwd)"
NAME="$(basename "$REPO")"; SHARED="$(dirname "$REPO")/shared"
C="${C%/}"; [ "$DEMO" = 1 ] && STEPS="$STEPS,demo"
[ -n "$LOCK" ] && [ ! -e "$LOCK" ] && LOCK=""
mkdir -p "$LOG_DIR"
T_ALL=$(date +%s)

# ---------------------------------------------------------------- mounts
MOUNTS=()   # made by this run, undone in reverse order on exit
mnt() {     # mnt TARGET mount-args...
  local target="$1"; shift
  mkdir -p "$target"
  mountpoint -q "$target" && return 0
  mount "$@" "$target" && MOUNTS+=("$target")
}
mount_all() {
  mnt "$C/proc" -t proc proc
  mnt "$C/sys" --bind /sys
  mnt "$C/dev" --bind /dev
  mnt "$C/dev/pts" --bind /dev/pts
  mnt "$C/dev/shm" -t tmpfs -o "size=${SHM_SIZE:-50%},mode=1777" tmpfs   # Ray's object store
  mnt "$C/srv/repo" --bind "$REPO" && mount -o remount,bind,ro "$C/srv/repo"
}
umount_all() {
  local i
  for ((i=${#MOUNTS[@]}-1; i>=0; i--)); do umount "${MOUNTS[i]}" 2>/dev/null || umount -l "${MOUNTS[i]}"; done
  MOUNTS=()
}
still_mounted() { awk -v c="$C/" 'index($2, c) == 1 {print $2}' /proc/mounts; }
trap umount_all EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- the fresh machine
# The host's registry reach (proxy, TLS-intercepting CA, pip settings) is copied in so that apt and pip
# inside reach the registries as the host does; local wheel folders/indexes of the host are left out
# (a fresh machine has only the public registries).
NET_ENV=()
for v in $(compgen -e | grep -E '^(PIP_|https?_proxy$|HTTPS?_PROXY$|no_proxy$|NO_PROXY$)'); do
  case "$v" in PIP_FIND_LINKS|PIP_EXTRA_INDEX_URL|PIP_NO_INDEX) continue ;; esac
  NET_ENV+=("$v=${!v}")
done
host_network_into_chroot() {
  cp -L /etc/resolv.conf "$C/etc/resolv.conf"
  [ -f "$C/etc/hosts" ] || printf '127.0.0.1\tlocalhost\n127.0.1.1\t%s\n' "$(hostname)" > "$C/etc/hosts"
  local f
  for f in /etc/apt/apt.conf.d/*; do
    grep -qE 'Acquire::(https?|ftp)::Proxy|Check-Valid-Until|Check-Date' "$f" 2>/dev/null && cp "$f" "$C/etc/apt/apt.conf.d/"
  done
  for f in /etc/pip.conf /root/.pip/pip.conf /root/.config/pip/pip.conf; do
    [ -f "$f" ] || continue
    mkdir -p "$C$(dirname "$f")"
    grep -vE '^\s*(find-links|extra-index-url|no-index)\s*=' "$f" > "$C$f"
  done
  if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    mkdir -p "$C/usr/local/share/ca-certificates"
    cp /usr/local/share/ca-certificates/*.crt "$C/usr/local/share/ca-certificates/"
    [ -x "$C/usr/sbin/update-ca-certificates" ] && chroot "$C" update-ca-certificates >/dev/null 2>&1
  fi
}

# A fresh login shell inside: only HOME, PATH, TERM (+ the host's registry settings), in its own PID
# namespace so that `ray stop` inside sees (and stops) only the chroot's processes, and whatever a step
# leaves running ends with it.
CHROOT_SH=(env -i HOME=/root PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin TERM="${TERM:-dumb}"
           "${NET_ENV[@]}" unshare --pid --fork --kill-child --mount-proc="$C/proc" chroot "$C" /bin/bash -l -c)
in_chroot() { "${CHROOT_SH[@]}" "$1"; }
in_clone() { in_chroot "cd /root/work/$NAME && $1"; }

build_chroot() {
  if [ "$FRESH" = 1 ] || [ ! -f "$C/etc/debian_version" ] || [ -d "$C/debootstrap" ]; then
    if [ -n "$(still_mounted)" ]; then echo "fresh_debian: $C has mounts, not removing it:"; still_mounted; return 1; fi
    rm -rf --one-file-system "$C"
    command -v debootstrap >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
    echo "debootstrap --variant=minbase bookworm $C $MIRROR (log: $LOG_DIR/chroot.log)"
    debootstrap --variant=minbase bookworm "$C" "$MIRROR" > "$LOG_DIR/chroot.log" 2>&1 \
      || { tail -n 20 "$LOG_DIR/chroot.log"; return 1; }
    # a Debian 12 install's sources: bookworm, bookworm-updates, bookworm-security
    cat > "$C/etc/apt/sources.list" <<EOF
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb ${MIRROR%/debian}/debian-security bookworm-security main
EOF
  fi
  host_network_into_chroot
  mount_all || return 1
  if ! in_chroot "command -v git && command -v python3" >/dev/null; then
    # what the README assumes: git and python3 (apt's defaults, Recommends included)
    echo "apt-get install -y git python3"
    in_chroot "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y git python3" >> "$LOG_DIR/chroot.log" 2>&1 \
      || { tail -n 20 "$LOG_DIR/chroot.log"; return 1; }
    grep -E 'newly installed' "$LOG_DIR/chroot.log"
    host_network_into_chroot   # the CA, now that ca-certificates is there
  fi
  echo "chroot: $(cat "$C/etc/debian_version"), $(in_chroot 'python3 --version; git --version' | tr '\n' ' ')"
  echo "chroot: ca-certificates $(in_chroot "dpkg-query -W -f='\${Status}' ca-certificates 2>/dev/null" || true)"
}

clone() {
  if [ "$FRESH" = 1 ] || [ ! -d "$C/root/work/$NAME/.git" ]; then
    rm -rf --one-file-system "$C/root/work/$NAME"
    in_chroot "mkdir -p /root/work && git clone -q /srv/repo /root/work/$NAME" || return 1
  fi
  rm -rf "$C/root/work/shared"
  [ -d "$SHARED" ] && cp -a "$SHARED" "$C/root/work/shared"
  pull
}
pull() { in_clone "git pull -q --ff-only && git log -1 --format='clone at %h %s' | cut -c1-100"; }

# ---------------------------------------------------------------- README's commands
# README marks each command block with `<!-- check: NAME -->` on the line before it.
README="$C/root/work/$NAME/README.md"
marked_block() {  # marked_block NAME: the first code block marked NAME, unindented
  awk -v m="<!-- check: $1 -->" 'index($0, m) == 1 {f = 1; next}
    f && /^    / {b = 1; sub(/^    /, ""); print; next}
    f && /^[[:space:]]*$/ {if (b) print; next}
    f {exit}' "$README"
}
readme_line() {   # the first code line matching an ERE, its trailing `\` removed
  grep -E '^    ' "$README" | sed 's/^    //' | grep -m1 -E -e "$1" | sed 's/[[:space:]]*\\$//'
}
run_step() {      # run_step NAME locked(0/1) COMMAND — in the clone, logged, timed
  local name="$1" locked="$2" cmd="$3" log="$LOG_DIR/$1.log" t0 t1 w rc secs wait
  echo "== $name: $cmd"
  echo "\$ $cmd" > "$log"
  t0=$(date +%s.%N)
  if [ "$locked" = 1 ] && [ -n "$LOCK" ]; then
    flock "$LOCK" bash -c 'date +%s.%N > "$0.t"; exec "$@"' "$log" \
      "${CHROOT_SH[@]}" "cd /root/work/$NAME && $cmd" >> "$log" 2>&1
    rc=$?
  else
    date +%s.%N > "$log.t"
    in_clone "$cmd" >> "$log" 2>&1; rc=$?
  fi
  t1=$(date +%s.%N); w=$(cat "$log.t"); rm -f "$log.t"
  secs=$(awk -v a="$w" -v b="$t1" 'BEGIN{printf "%.0f", b-a}')
  wait=$(awk -v a="$t0" -v b="$w" 'BEGIN{printf "%.0f", b-a}')
  if [ $rc -eq 0 ]; then RESULT+=("$name ok ${secs}s (lock wait ${wait}s)")
  else RESULT+=("$name FAILED rc=$rc ${secs}s — $log"); FAILED=1; tail -n 15 "$log" | sed 's/^/   | /'; fi
  echo "   $name: rc=$rc, ${secs}s (+${wait}s waiting for the lock)"
  return $rc
}
missing() { RESULT+=("$1 FAILED: $2"); FAILED=1; echo "== $1: $2"; }
has() { case ",$STEPS," in *",$1,"*) return 0 ;; esac; return 1; }
# `.venv/bin/python -m jobs.prepare_demo --modalities image --output demo_data` when a step needs the
# raw MNIST folder and it is not there (seconds)
NEED_IMAGE="{ [ -d demo_data/image/train ] || .venv/bin/python -m jobs.prepare_demo --modalities image --output demo_data; }"

RESULT=(); FAILED=0
build_chroot || { echo "fresh_debian: chroot failed"; exit 1; }
clone || { echo "fresh_debian: clone failed"; exit 1; }

if has setup; then   # README's demo line up to `&&`: `bash setup.sh`
  pull; l="$(marked_block demo | head -n1)"
  if [ -n "$l" ]; then run_step setup 0 "${l%% && *}"; else missing setup "no block marked demo in README"; fi
fi
if has prepare; then   # README's prepare-demo block, RAW a new folder
  pull; b="$(marked_block prepare-demo)"
  if [ -n "$b" ]; then run_step prepare 1 "rm -rf runs/fresh_raw && set -e; ${b//RAW/runs/fresh_raw}"
  else missing prepare "no block marked prepare-demo in README"; fi
fi
if has preprocess; then   # README's image preprocess line on the demo's MNIST train split, 28 px as the demo
  pull; l="$(readme_line '-m jobs\.preprocess --modality image')"
  if [ -n "$l" ]; then
    l="$(sed -e 's#--input DIR#--input demo_data/image/train#' -e 's#--output OUT#--output runs/demo/data/image_train#' \
             -e 's#\[--image-size [0-9]*\]#--image-size 28#' -e 's#[[:space:]]*\[[^]]*\]##g' <<< "$l")"
    run_step preprocess 1 "set -e; $NEED_IMAGE; rm -rf runs/demo/data/image_train; $l"
  else missing preprocess "no jobs.preprocess --modality image line in README"; fi
fi
if has print-config; then   # README's print-config block (OUT: that folder); a training line gets --max-steps 20
  pull; b="$(marked_block print-config)"
  if [ -n "$b" ]; then
    b="$(sed -e 's#--data OUT#--data runs/demo/data/image_train#g' -e 's#RUN_DIR#runs/print_config#g' \
             -e '/--print-config/!s#-m jobs\.pretrain .*#& --max-steps 20#' <<< "$b")"
    run_step print-config 1 "set -e; [ -f runs/demo/data/image_train/manifest.json ] || { $NEED_IMAGE; .venv/bin/python -m jobs.preprocess --modality image --input demo_data/image/train --output runs/demo/data/image_train --image-size 28; }; rm -rf runs/print_config my.yaml
$b
grep -E '^ *max_steps: ' my.yaml; rm -f my.yaml"
  else missing print-config "no block marked print-config in README"; fi
fi
if has ray-submit; then   # README's local-submit block as written; its data made by jobs.demo first if missing
  pull; b="$(marked_block local-submit)"
  if [ -n "$b" ]; then
    d="$(grep -oE 'runs/demo/data/[a-z]+_[a-z]+' <<< "$b" | head -n1)"; pre=":"   # e.g. runs/demo/data/text_pretrain
    [ -n "$d" ] && pre="[ -f $d/manifest.json ] || .venv/bin/python -m jobs.demo --modalities $(basename "$d" | cut -d_ -f1)"
    stop="$(tail -n1 <<< "$b")"   # `ray stop`: run even when the block stops early
    run_step ray-submit 1 "$pre || exit 1; rm -rf runs/job1; trap '$stop >/dev/null 2>&1' EXIT; set -ex
$b"
  else missing ray-submit "no block marked local-submit in README"; fi
fi
if has collect; then   # README's test command, collected only
  pull; l="$(marked_block tests | head -n1)"
  if [ -n "$l" ]; then run_step collect 1 "set -o pipefail; ${l##* && } --collect-only | tail -n 1"
  else missing collect "no block marked tests in README"; fi
fi
if has demo; then   # README's demo line as written, from scratch (no raw files, no preprocessed folders)
  pull; l="$(marked_block demo | head -n1)"
  if [ -n "$l" ]; then run_step demo 1 "rm -rf demo_data runs/demo && $l"
  else missing demo "no block marked demo in README"; fi
fi

umount_all
echo
echo "fresh_debian: $REPO in $C, $(($(date +%s) - T_ALL)) s"
printf '  %s\n' "${RESULT[@]}"
[ -n "$(still_mounted)" ] && { echo "still mounted:"; still_mounted; }
exit $FAILED
