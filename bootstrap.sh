#!/usr/bin/env bash
# bootstrap.sh: the executable of the pixicache HTCondor job (see mnist_gpu.sub).
#
# On the execute node it needs only bash, coreutils and python3 >= 3.9. It
#   1. prints where it runs: host, time, GPUs assigned, scratch dir, free disk;
#   2. finds python3 >= 3.9 (the newest of the usual names; EL9's python3 is 3.9, for
#      which the bundle carries a py-rattler build of its own);
#   3. obtains the agent as one file: pixicache.pyz transferred with the job, or fetched
#      from $PIXICACHE_AGENT_URL (default $PIXICACHE_MIRROR/agent/pixicache.pyz); either
#      way it must match PIXICACHE_AGENT_SHA256 when that is set, and a fetched agent
#      must have it set (`pixicache bundle` prints the digest);
#   4. unpacks the data (MNIST_data.tar.gz -> data/MNIST/raw/...);
#   5. runs `pixicache run ${PIXICACHE_TASK:-train} "$@"` (the job's arguments go to the
#      task), forwarding SIGTERM/SIGINT/SIGHUP (eviction, condor_rm) to the agent, which
#      forwards them to the task;
#   6. explains the agent's exit code in words and exits with it.
#
# Outputs: the directory out/ is created first thing and holds, whatever happens,
# pixicache-report.json (the agent's, or a short one of bootstrap.sh's own when the
# agent never ran) and the files named in PIXICACHE_OUTPUTS (default mnist_cnn.pt) that
# the task wrote. mnist_gpu.sub transfers out/, so a failed job never goes on hold for a
# missing output file. Where HTCondor's chirp is available, the exit code, who produced
# it (task, agent or bootstrap) and the agent's message go into the job ad
# (ChirpExitCode, ChirpExitSource, ChirpExitReason) for the submit file's hold reason.
#
# Environment (set in the submit file's `environment`, or by the site):
#   PIXICACHE_MIRROR        the site mirror (`pixicache serve`), e.g. http://mirror:8080
#   PIXICACHE_SOURCES       where packages come from; default: mirror=$PIXICACHE_MIRROR,upstream
#                           (upstream alone without a mirror)
#   PIXICACHE_CACHE_DIR     the node store, shared by the jobs on a node. Sites should set
#                           it to a node-local directory outside the job's private /tmp
#                           (HTCondor's MOUNT_UNDER_SCRATCH), e.g. /var/cache/pixicache
#                           (setgid group, umask 002 for several users). Default:
#                           ${PIXICACHE_NODE_CACHE:-/tmp/pixicache-$(id -u)}, else
#                           $_CONDOR_SCRATCH_DIR/.pixicache if /tmp is not writable.
#   PIXICACHE_AGENT_SHA256  the agent's SHA-256 (required when the agent is fetched)
#   PIXICACHE_AGENT_URL     where to fetch the agent from (default: see above)
#   PIXICACHE_PYTHON        the interpreter to use (default: the newest python3 found)
#   PIXICACHE_TASK          the manifest's task to run (default: train)
#   PIXICACHE_OUTPUTS       files the task writes that go into out/ (default: mnist_cnn.pt)
#
# Exit codes: the task's own code when it ran; otherwise the agent's (pixicache/errors.py):
#   2 bad manifest/lock, 3 download failed, 4 digest mismatch, 5 install failed,
#   6 task could not start, 7 node store unusable, 8 this node cannot run the job
#   (no python3 >= 3.9, no GPU, driver too old, no disk), 9 configuration.
#   bootstrap.sh itself exits 8 without python3 >= 3.9, 3 when it cannot fetch the
#   agent, 4 when the agent's digest does not match, 2 when a transferred file is missing.
set -euo pipefail

say() { printf 'bootstrap: %s\n' "$*"; }
warn() { printf 'bootstrap: %s\n' "$*" >&2; }
failure=     # why bootstrap.sh itself stopped (for out/pixicache-report.json and the job ad)
exit_source=bootstrap
exit_reason=
die() {
  local code=$1
  shift
  failure="$*"
  printf 'bootstrap: ERROR: %s\n' "$*" >&2
  exit "$code"
}
# shellcheck disable=SC2317  # called from finish (the EXIT trap)
json_string() { # a JSON string literal of $1 (one line)
  local s=${1//\\/\\\\}
  s=${s//\"/\\\"}
  printf '"%s"' "$(printf '%s' "$s" | tr '\n\r\t' '   ' | tr -d '\000-\037')"
}
# shellcheck disable=SC2317  # called from finish (the EXIT trap)
chirp() { # chirp ATTR VALUE: put ATTR into the job ad when the job exits (best effort)
  [ -n "${_CONDOR_CHIRP_CONFIG:-}" ] || return 0
  local exe libexec
  exe=$(command -v condor_chirp 2>/dev/null) || exe=
  if [ -z "$exe" ]; then
    libexec=$(condor_config_val LIBEXEC 2>/dev/null) || libexec=/usr/libexec/condor
    exe=$libexec/condor_chirp
  fi
  [ -x "$exe" ] || return 0
  timeout 20 "$exe" set_job_attr_delayed "$1" "$2" >/dev/null 2>&1 || true
}
# shellcheck disable=SC2317  # run by the EXIT trap
finish() {
  local rc=$? out
  trap - EXIT
  mkdir -p out 2>/dev/null || true
  for out in ${PIXICACHE_OUTPUTS:-mnist_cnn.pt}; do
    if [ -f "$out" ]; then mv -f "$out" out/ 2>/dev/null || cp -f "$out" out/ || true; fi
  done
  if [ -f pixicache-report.json ]; then
    mv -f pixicache-report.json out/ 2>/dev/null || cp -f pixicache-report.json out/ || true
  elif [ ! -f out/pixicache-report.json ]; then
    printf '{"schema": "pixicache.report/1", "command": "bootstrap", "exit_code": %d, "error": {"type": "BootstrapError", "message": %s, "exit_code": %d}, "notes": []}\n' \
      "$rc" "$(json_string "${failure:-bootstrap.sh stopped with exit code $rc}")" "$rc" >out/pixicache-report.json || true
  fi
  chirp ChirpExitCode "$rc"
  chirp ChirpExitSource "$(json_string "$exit_source")"
  if [ -n "${failure:-$exit_reason}" ]; then
    chirp ChirpExitReason "$(json_string "$(printf '%.300s' "${failure:-$exit_reason}")")"
  fi
  exit "$rc"
}
trap finish EXIT

# ---- 1. where are we ----------------------------------------------------------------
scratch=${_CONDOR_SCRATCH_DIR:-$PWD}
cd "$scratch"
mkdir -p out
rm -f out/pixicache-report.json # a stale one (a restarted job) would describe another run
say "host $(hostname 2>/dev/null || uname -n) ($(uname -sm)), $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
say "scratch dir $scratch ($(df -Ph . 2>/dev/null | awk 'NR==2 {print $4 " free on " $6}'))"
say "GPUs assigned: _CONDOR_AssignedGPUs='${_CONDOR_AssignedGPUs:-}' CUDA_VISIBLE_DEVICES='${CUDA_VISIBLE_DEVICES:-}'"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi -L 2>&1 | sed 's/^/bootstrap:   /' || true
else
  say "no nvidia-smi on this node"
fi

# ---- 2. python3 >= 3.9 --------------------------------------------------------------
# The newest of the usual names wins, so a node whose python3 is 3.6 (EL8) but that
# has python3.11 installed runs the agent with 3.11.
pyver() { "$1" -I -c 'import sys; print("%d %d" % sys.version_info[:2])' 2>/dev/null; }
python=
best=0
seen=()
candidates=(python3 python3.14 python3.13 python3.12 python3.11 python3.10 python3.9)
if [ -n "${PIXICACHE_PYTHON:-}" ]; then
  candidates=("$PIXICACHE_PYTHON")
fi
for name in "${candidates[@]}"; do
  path=$(command -v "$name" 2>/dev/null) || continue
  read -r major minor < <(pyver "$path" || echo "0 0") || true
  seen+=("$path=${major:-?}.${minor:-?}")
  rank=$((${major:-0} * 100 + ${minor:-0}))
  if [ "$rank" -ge 309 ] && [ "$rank" -gt "$best" ]; then
    python=$path
    best=$rank
  fi
done
if [ -z "$python" ]; then
  die 8 "this execute node has no python3 >= 3.9; found: ${seen[*]:-none} (PATH=$PATH)." \
    "Ask the pool's admins for python3.9 or newer on the execute nodes (RHEL/Rocky 8: dnf install python39)," \
    "or set PIXICACHE_PYTHON in the submit file's environment to one that the nodes have."
fi
say "python: $python ($((best / 100)).$((best % 100)))"

# ---- 3. the agent, one file ---------------------------------------------------------
sha256_of() {
  if command -v sha256sum >/dev/null 2>&1; then
    sha256sum "$1" | awk '{print $1}'
  else
    "$python" -I -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' "$1"
  fi
}
fetch() { # fetch URL FILE: curl, else wget, else python
  if command -v curl >/dev/null 2>&1; then
    curl -fsSL --retry 3 --retry-delay 2 --connect-timeout 20 -o "$2" "$1"
  elif command -v wget >/dev/null 2>&1; then
    wget -q --tries=3 --timeout=60 -O "$2" "$1"
  else
    "$python" -I -c 'import shutil, sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=60) as r, open(sys.argv[2], "wb") as f:
    shutil.copyfileobj(r, f)' "$1" "$2"
  fi
}
agent=pixicache.pyz
want=$(printf '%s' "${PIXICACHE_AGENT_SHA256:-}" | tr 'A-F' 'a-f')
if [ -f "$agent" ]; then
  origin="transferred with the job"
else
  url=${PIXICACHE_AGENT_URL:-}
  if [ -z "$url" ] && [ -n "${PIXICACHE_MIRROR:-}" ]; then
    url="${PIXICACHE_MIRROR%/}/agent/pixicache.pyz"
  fi
  if [ -z "$url" ]; then
    die 2 "no agent: pixicache.pyz was not transferred and neither PIXICACHE_AGENT_URL nor PIXICACHE_MIRROR is set." \
      "Build it with 'pixicache bundle -o pixicache.pyz' beside the submit file (it is in transfer_input_files)."
  fi
  if [ -z "$want" ]; then
    die 4 "refusing to run an agent fetched from $url without a digest to check: add" \
      "PIXICACHE_AGENT_SHA256=<sha256> (printed by 'pixicache bundle') to the submit file's environment."
  fi
  say "fetching the agent from $url"
  if ! fetch "$url" "$agent.part"; then
    rm -f "$agent.part"
    die 3 "cannot fetch the agent from $url: the mirror is unreachable or does not serve it." \
      "Check that the mirror is up and reachable from execute nodes (curl -I $url), and PIXICACHE_MIRROR in the submit file."
  fi
  mv -f "$agent.part" "$agent"
  origin="fetched from $url"
fi
got=$(sha256_of "$agent")
if [ -n "$want" ] && [ "$got" != "$want" ]; then
  die 4 "the agent ($agent, $origin) has SHA-256 $got but the submit file expects $want." \
    "Rebuild/republish it, or update PIXICACHE_AGENT_SHA256 to what 'pixicache bundle' printed."
fi
say "agent: $agent ($origin; sha256 $got${want:+, verified})"

# ---- 4. data ------------------------------------------------------------------------
for tarball in data/MNIST_data.tar.gz MNIST_data.tar.gz; do
  if [ -f "$tarball" ]; then
    if [ -d data/MNIST/raw ]; then
      say "data: data/MNIST/raw already present"
    else
      tar -xzf "$tarball" -C . || die 2 "cannot unpack $tarball (a truncated transfer?)"
      say "data: unpacked $tarball into data/"
    fi
    break
  fi
done

# ---- 5. run the agent ---------------------------------------------------------------
[ -f pixi.toml ] || die 2 "pixi.toml is missing from the job's sandbox: add it to transfer_input_files"
if [ -z "${PIXICACHE_CACHE_DIR:-}" ]; then
  PIXICACHE_CACHE_DIR=${PIXICACHE_NODE_CACHE:-/tmp/pixicache-$(id -u)}
  if ! mkdir -p "$PIXICACHE_CACHE_DIR" 2>/dev/null || [ ! -w "$PIXICACHE_CACHE_DIR" ]; then
    PIXICACHE_CACHE_DIR=$scratch/.pixicache
  fi
  export PIXICACHE_CACHE_DIR
  say "node store: $PIXICACHE_CACHE_DIR (default; a site sets PIXICACHE_CACHE_DIR to share one per node)"
else
  say "node store: $PIXICACHE_CACHE_DIR"
fi
if [ -z "${PIXICACHE_SOURCES:-}" ]; then
  if [ -n "${PIXICACHE_MIRROR:-}" ]; then
    export PIXICACHE_SOURCES="mirror=${PIXICACHE_MIRROR},upstream"
  else
    export PIXICACHE_SOURCES=upstream
  fi
fi
say "sources: $PIXICACHE_SOURCES"
task=${PIXICACHE_TASK:-train}
rm -f pixicache-report.json # a stale one would describe another run
say "running: $python -I $agent run $task $*"

agent_pid=
pending=
# shellcheck disable=SC2317  # invoked by the traps below
forward() {
  if [ -n "$agent_pid" ]; then
    warn "received SIG$1: forwarding it to the agent (pid $agent_pid) and its task"
    kill -s "$1" "$agent_pid" 2>/dev/null || true
  else
    pending=$1 # arrived before the agent started: sent to it as soon as it has
  fi
}
# A background job of a non-interactive shell ignores SIGINT, so INT is forwarded as TERM.
trap 'forward TERM' TERM
trap 'forward TERM' INT
trap 'forward HUP' HUP
"$python" -I "$agent" run "$task" "$@" &
agent_pid=$!
if [ -n "$pending" ]; then forward "$pending"; fi
rc=0
while :; do
  wait "$agent_pid" && rc=0 || rc=$?
  # wait returns early when a trapped signal arrives: go on waiting while the agent runs.
  kill -0 "$agent_pid" 2>/dev/null || break
done
trap - TERM INT HUP

# ---- 6. what happened ---------------------------------------------------------------
# The report says whether the task ran (then rc is the task's code) and where the
# packages came from.
report=pixicache-report.json
who=
if [ -f "$report" ]; then
  summary=$("$python" -I - "$report" <<'PY' 2>/dev/null || true
import json, sys
r = json.load(open(sys.argv[1]))
def size(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return "%.1f %s" % (n, unit) if unit != "B" else "%d B" % n
        n /= 1024.0
tiers = r.get("tiers") or {}
parts = ["%s %d (%s)" % (name, t["artifacts"], size(t.get("bytes", 0)))
         for name in ("store", "local", "mirror", "upstream")
         for t in [tiers.get(name) or {}] if t.get("artifacts")]
count = (r.get("artifacts") or {}).get("count") or 0
task = r.get("task")
print("task" if isinstance(task, dict) and task.get("exit_code") is not None else "agent")
print("packages: %d needed; from %s" % (count, ", ".join(parts) or "nowhere"))
err = (r.get("error") or {}).get("message") or ""
for line in [l.strip() for l in err.splitlines() if l.strip().startswith("- ")][:3]:
    print("reason: " + line[2:])
first = " ".join(err.split("\n", 1)[0].split())
if first:
    print("error: " + first[:300])
PY
)
  who=${summary%%$'\n'*}
  if [ "$summary" != "$who" ]; then
    while IFS= read -r line; do
      case "$line" in
        "error: "*) exit_reason=${line#error: } ;;
        *) say "$line" ;;
      esac
    done <<<"${summary#*$'\n'}"
  fi
fi
exit_source=${who:-agent}
for out in ${PIXICACHE_OUTPUTS:-mnist_cnn.pt} "$report"; do
  if [ -f "$out" ]; then say "output: out/$out ($(du -h "$out" | cut -f1))"; fi
done

if [ "$rc" -eq 0 ]; then
  say "done: task '$task' finished (exit 0)"
  exit 0
fi
if [ "$rc" -gt 128 ]; then
  sig=$(kill -l "$((rc - 128))" 2>/dev/null || echo "$((rc - 128))")
  warn "stopped by SIG$sig (exit $rc): the job was evicted or removed (HTCondor sends SIGTERM);" \
    "a checkpoint, if the task wrote one, lets it resume"
  exit "$rc"
fi
if [ "$who" = task ] || { [ -z "$who" ] && [ "$rc" -gt 9 ]; }; then
  warn "task '$task' failed with exit code $rc: see its output above"
  exit "$rc"
fi
case "$rc" in
  1) why="the agent crashed (internal error): please report it with this job's .err file" ;;
  2) why="pixi.toml or pixi.lock cannot be used (or bad arguments): re-lock with 'pixi lock' on the submit machine and resubmit" ;;
  3) why="packages could not be downloaded: is the mirror (${PIXICACHE_MIRROR:-none set}) up and reachable from this node? sources: $PIXICACHE_SOURCES" ;;
  4) why="a download did not match pixi.lock's SHA-256 (a corrupt mirror or cache entry): nothing was installed from it; tell the mirror's admins" ;;
  5) why="installing the environment failed (disk full? see the message above)" ;;
  6) why="the task '$task' could not be started: check [tasks] in pixi.toml" ;;
  7) why="the node store $PIXICACHE_CACHE_DIR is unusable (permissions or disk full): set PIXICACHE_CACHE_DIR to a writable local directory" ;;
  8) why="preflight: this node cannot run the job now (mirror unreachable, no GPU, NVIDIA driver too old, not enough disk...): the reason above says what to fix or which requirement to add to the submit file" ;;
  9) why="a pixicache setting is invalid (PIXICACHE_* environment or config file)" ;;
  *) why="unexpected exit code" ;;
esac
warn "pixicache failed (exit $rc): $why"
exit "$rc"
