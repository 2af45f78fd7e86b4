#!/usr/bin/env bash
# Builds qtune's image and runs docker-compose.yml for real, as a user would, on this machine's own
# Docker engine (Debian's docker.io). Public base images cannot be pulled here, so the Debian base is
# made with debootstrap from the Debian mirror apt already uses (once per machine, cached by name),
# and the runtime image is built around the qtune binary built on the host (`--target prebuilt`:
# the Rust image cannot be pulled either). Then, through the compose file plus docker/compose.ci.yml
# (the test model mounted read-only; the compose file's port published on a free loopback port):
#   the healthcheck turns healthy; the process runs as uid 10001; QTUNE_API_KEYS locks /v1;
#   the host's CLI submits a tiny job (its dataset uploaded) that succeeds inside the container and
#   its adapter downloads; after `docker-compose restart` the job, its metrics and its adapter are
#   still there (named volume); `docker-compose down -v` removes container and volume.
# docker/Dockerfile.cuda's runtime stage is built on the same Debian base (its CUDA images cannot be
# pulled here). Any failure prints the container's logs and fails the script.
# Needs root (it installs packages and may start dockerd, which it then stops again).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
started_at=$(date +%s)
say() { echo "[docker-check +$(($(date +%s) - started_at))s] $*"; }

# --- the engine ------------------------------------------------------------------------------
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v docker-compose >/dev/null || missing+=(docker-compose)
if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]} (Debian)"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
fi
# Debian's client, which matches its engine and has BuildKit built in (a newer client elsewhere on
# PATH may need the buildx plugin for it).
DOCKER=/usr/bin/docker
export DOCKER_BUILDKIT=1

docker-compose -f docker-compose.yml config -q
docker-compose -f docker-compose.yml -f docker-compose.gpu.yml config -q
docker-compose -f docker-compose.scale.yml config -q
say "docker-compose.yml, docker-compose.gpu.yml and docker-compose.scale.yml are valid"

WORK=$(mktemp -d)
DOCKERD_PID=""
PROJECT="qtuneci$$"
COMPOSE=(docker-compose -p "$PROJECT" -f docker-compose.yml -f docker/compose.ci.yml)
compose_up=false

finish() {
    status=$?
    if [ "$status" -ne 0 ] && $compose_up; then
        echo "---- docker-check failed; the container's logs:" >&2
        "${COMPOSE[@]}" logs --no-color --tail=200 >&2 || true
        cid=$("${COMPOSE[@]}" ps -q qtune 2>/dev/null || true)
        [ -n "$cid" ] && $DOCKER inspect -f '{{json .State.Health}}' "$cid" >&2 || true
    fi
    if $compose_up; then
        "${COMPOSE[@]}" down -v >/dev/null 2>&1 || true
    fi
    if [ -n "$DOCKERD_PID" ]; then
        kill "$DOCKERD_PID" 2>/dev/null || true
        wait "$DOCKERD_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
    exit "$status"
}
trap finish EXIT

if ! $DOCKER info >/dev/null 2>&1; then
    say "starting dockerd"
    dockerd >"$WORK/dockerd.log" 2>&1 &
    DOCKERD_PID=$!
    for _ in $(seq 60); do
        $DOCKER info >/dev/null 2>&1 && break
        sleep 0.5
    done
    $DOCKER info >/dev/null 2>&1 || { cat "$WORK/dockerd.log" >&2; echo "dockerd did not start" >&2; exit 1; }
fi

# --- the base image: Debian bookworm from Debian's own packages --------------------------------
BASE_IMAGE=qtune-ci/debian:bookworm
if ! $DOCKER image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null \
        | grep -oE '^(URIs:|deb) +https?://[^ ]+' | grep -v security | head -1 | awk '{print $2}' || true)
    mirror=${mirror:-http://deb.debian.org/debian}
    say "making $BASE_IMAGE with debootstrap from $mirror"
    debootstrap --variant=minbase bookworm "$WORK/rootfs" "$mirror" >"$WORK/debootstrap.log" 2>&1 \
        || { tail -20 "$WORK/debootstrap.log" >&2; exit 1; }
    rm -rf "$WORK"/rootfs/var/cache/apt/archives/*.deb "$WORK"/rootfs/var/lib/apt/lists/*
    tar -C "$WORK/rootfs" -c . | $DOCKER import - "$BASE_IMAGE" >/dev/null
    rm -rf "$WORK/rootfs"
fi

# --- qtune's image, around the binary built here ----------------------------------------------
say "building the qtune binary"
# the binary the tests use: after the test command this is a no-op (a plain `cargo build` resolves
# dev-dependencies' features differently and would compile much of the tree again)
cargo test --no-run --quiet
TARGET_DIR=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
QTUNE="$TARGET_DIR/debug/qtune"
mkdir -p "$WORK/context"
strip -o "$WORK/context/qtune" "$QTUNE"

IMAGE=qtune:ci-check
say "building $IMAGE (docker/Dockerfile, --target prebuilt)"
$DOCKER build --quiet --network host -f docker/Dockerfile --target prebuilt \
    --build-arg RUNTIME_IMAGE="$BASE_IMAGE" -t "$IMAGE" "$WORK/context" >/dev/null
say "image $IMAGE: $($DOCKER image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}')"

say "building docker/Dockerfile.cuda's runtime stage on the Debian base (its CUDA images cannot be pulled here)"
$DOCKER build --quiet --network host -f docker/Dockerfile.cuda --target prebuilt \
    --build-arg CUDA_RUNTIME_IMAGE="$BASE_IMAGE" -t qtune:ci-check-cuda-runtime "$WORK/context" >/dev/null
$DOCKER image rm qtune:ci-check-cuda-runtime >/dev/null

# --- docker-compose.yml, for real --------------------------------------------------------------
./scripts/fetch-test-models.sh >/dev/null
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
KEY="ci-$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')"
export QTUNE_CI_IMAGE="$IMAGE" QTUNE_PORT="127.0.0.1:$PORT" \
    QTUNE_CI_MODELS="$ROOT/.cache/test-models" QTUNE_API_KEYS="$KEY"
BASE_URL="http://127.0.0.1:$PORT"

wait_healthy() {
    local cid since
    cid=$("${COMPOSE[@]}" ps -q qtune)
    since=$(date +%s.%N)
    for _ in $(seq 180); do
        case $($DOCKER inspect -f '{{.State.Health.Status}}' "$cid") in
            healthy)
                python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$since" "$(date +%s.%N)"
                return 0 ;;
            unhealthy) echo "the container turned unhealthy" >&2; return 1 ;;
        esac
        sleep 0.5
    done
    echo "the container was not healthy after 90 s" >&2
    return 1
}

say "docker-compose up"
compose_up=true
up_at=$(date +%s.%N)
"${COMPOSE[@]}" up -d --no-build 2>&1 | grep -v "^Creating" || true
"${COMPOSE[@]}" ps -q qtune | grep -q . || { echo "docker-compose up started no container" >&2; exit 1; }
for _ in $(seq 300); do
    curl -fsS -o /dev/null "$BASE_URL/healthz" 2>/dev/null && break
    sleep 0.1
done
answered=$(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$up_at" "$(date +%s.%N)")
say "/healthz answered ${answered} s after docker-compose up began"
say "healthy $(wait_healthy) s later (healthcheck every 2 s here, every 10 s in docker-compose.yml)"
CID=$("${COMPOSE[@]}" ps -q qtune)

uid=$(ps -o uid= -p "$($DOCKER inspect -f '{{.State.Pid}}' "$CID")" | tr -d ' ')
[ "$uid" = 10001 ] || { echo "qtune runs as uid $uid, not 10001" >&2; exit 1; }
say "qtune runs as uid $uid"

code=$(curl -s -o /dev/null -w '%{http_code}' "$BASE_URL/v1/jobs")
[ "$code" = 401 ] || { echo "/v1/jobs without a key answered $code, not 401" >&2; exit 1; }
code=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $KEY" "$BASE_URL/v1/jobs")
[ "$code" = 200 ] || { echo "/v1/jobs with the key answered $code, not 200" >&2; exit 1; }
say "QTUNE_API_KEYS locks /v1 (401 without the key, 200 with it)"

export QTUNE_SERVER="$BASE_URL" QTUNE_API_KEY="$KEY"
cat >"$WORK/spec.json" <<EOF
{
  "base_model": "/models/SmolLM2-135M-Instruct.Q4_1.gguf",
  "dataset": {"url": "$ROOT/examples/facts.jsonl", "format": "messages", "validation_split": 0.05},
  "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
  "training": {"max_steps": 4, "batch_size": 2, "max_seq_len": 64, "eval_every_steps": 2},
  "checkpoint_every_steps": 2,
  "seed": 0
}
EOF
JOB=$("$QTUNE" submit "$WORK/spec.json" | head -1)
say "submitted job $JOB; following it"
"$QTUNE" follow "$JOB" || true
job_json() { curl -fsS -H "Authorization: Bearer $KEY" "$BASE_URL/v1/jobs/$JOB"; }
job_status=$(job_json | python3 -c 'import json,sys; print(json.load(sys.stdin)["status"])')
[ "$job_status" = succeeded ] || { echo "job $JOB: $job_status"; job_json >&2; exit 1; }
"$QTUNE" download "$JOB" "$WORK/adapter-before"
for f in adapter_model.safetensors adapter_config.json; do
    [ -s "$WORK/adapter-before/$f" ] || { echo "the adapter has no $f" >&2; exit 1; }
done
curl -fsS -H "Authorization: Bearer $KEY" "$BASE_URL/v1/jobs/$JOB/metrics" >"$WORK/metrics-before"
steps=$(python3 -c 'import json,sys; print(len(json.load(open(sys.argv[1]))["data"]))' "$WORK/metrics-before")
[ "$steps" -ge 4 ] || { echo "the job recorded $steps metrics rows, expected at least its 4 steps" >&2; exit 1; }
say "job $JOB succeeded inside the container; adapter downloaded; $steps metrics rows"

say "docker-compose restart"
"${COMPOSE[@]}" restart >/dev/null 2>&1
say "healthy again $(wait_healthy) s after the restart"
job_status=$(job_json | python3 -c 'import json,sys; print(json.load(sys.stdin)["status"])')
[ "$job_status" = succeeded ] || { echo "after the restart job $JOB is $job_status" >&2; exit 1; }
curl -fsS -H "Authorization: Bearer $KEY" "$BASE_URL/v1/jobs/$JOB/metrics" >"$WORK/metrics-after"
cmp -s "$WORK/metrics-before" "$WORK/metrics-after" || { echo "the job's metrics changed across the restart" >&2; exit 1; }
"$QTUNE" download "$JOB" "$WORK/adapter-after"
diff -r "$WORK/adapter-before" "$WORK/adapter-after" >/dev/null || { echo "the adapter changed across the restart" >&2; exit 1; }
say "after the restart the job, its metrics and its adapter are unchanged (named volume)"

VOLUME="${PROJECT}_qtune-data"
"${COMPOSE[@]}" down -v >/dev/null 2>&1
compose_up=false
if $DOCKER volume inspect "$VOLUME" >/dev/null 2>&1 || [ -n "$($DOCKER ps -aq --filter "label=com.docker.compose.project=$PROJECT")" ]; then
    echo "docker-compose down -v left the container or the volume $VOLUME" >&2
    exit 1
fi
say "docker-compose down -v removed the container and the volume; docker check passed"
