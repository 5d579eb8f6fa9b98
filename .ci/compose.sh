#!/usr/bin/env bash
# Brings the shipped docker-compose.yml up for real, with local images made from Debian's
# packages (Docker Hub cannot be reached from CI): a base root file system from debootstrap,
# Redis from Debian's redis-server, labfleet's runtime image from the binaries CI has just
# built (.ci/Dockerfile.runtime), Prometheus from Debian's prometheus. The images are swapped
# in by .ci/compose.override.yml, so the file users run stays as it is. Then: 3 workers, the
# producer must exit 0 with the class done, every worker must be healthy and serve /metrics,
# Prometheus (the `monitoring` profile) must scrape all three; then everything is taken down.
#
# Usage: .ci/compose.sh [BIN_DIR]   (default target/debug). Prints each phase's seconds.
# LABFLEET_CI_NO_DOCKER=1 skips it (with a loud warning) on a machine that cannot run dockerd.
set -euo pipefail
cd "$(dirname "$0")/.."
bin_dir=${1:-target/debug}
project=labfleet-ci
base_image=local/debian:bookworm-slim
files=(-f docker-compose.yml -f .ci/compose.override.yml)

t0=$(date +%s)
step_start=$t0
step() {
    local now
    now=$(date +%s)
    echo "::: compose: ${1} (previous step took $((now - step_start)) s)"
    step_start=$now
}
loud() {
    echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!" >&2
    echo "!!! $*" >&2
    echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!" >&2
}

if [ "${LABFLEET_CI_NO_DOCKER:-}" = 1 ]; then
    loud "LABFLEET_CI_NO_DOCKER=1: the Docker Compose stack is NOT tested in this run"
    exit 0
fi

# Debian's docker CLI speaks the API of Debian's dockerd; another docker on PATH may not.
docker=docker
[ -x /usr/bin/docker ] && docker=/usr/bin/docker
work=$(mktemp -d /tmp/labfleet-compose.XXXXXX)
dockerd_pid=
cleanup() {
    local rc=$?
    if [ -n "${compose_up:-}" ]; then
        docker-compose "${files[@]}" -p "$project" --profile monitoring down -v --remove-orphans >/dev/null 2>&1 || true
    fi
    if [ -n "$dockerd_pid" ]; then
        kill "$dockerd_pid" 2>/dev/null || true
        for _ in $(seq 1 100); do kill -0 "$dockerd_pid" 2>/dev/null || break; sleep 0.1; done
    fi
    rm -rf "$work"
    exit $rc
}
trap cleanup EXIT

step "dockerd"
if ! $docker info >/dev/null 2>&1; then
    if ! command -v dockerd >/dev/null 2>&1; then
        loud "dockerd is not installed (apt-get install docker.io): the Docker Compose stack cannot be tested"
        exit 1
    fi
    dockerd >/tmp/labfleet-ci-dockerd.log 2>&1 &
    dockerd_pid=$!
    for _ in $(seq 1 300); do
        $docker info >/dev/null 2>&1 && break
        kill -0 "$dockerd_pid" 2>/dev/null || break
        sleep 0.1
    done
    if ! $docker info >/dev/null 2>&1; then
        loud "dockerd did not start: the Docker Compose stack cannot be tested. Its log:"
        tail -n 30 /tmp/labfleet-ci-dockerd.log >&2 || true
        exit 1
    fi
    echo "started dockerd (pid $dockerd_pid; log /tmp/labfleet-ci-dockerd.log)"
fi
export DOCKER_HOST=unix:///var/run/docker.sock

step "base image ($base_image)"
if $docker image inspect "$base_image" >/dev/null 2>&1; then
    echo "cached: $base_image (from an earlier run on this machine)"
else
    # The mirror this machine's apt uses, so the image's apt-get reaches the same one.
    mirror=$(sed -n 's/^URIs: *\(\S*\/debian\)$/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n 1)
    mirror=${mirror:-http://deb.debian.org/debian}
    debootstrap --variant=minbase bookworm "$work/rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 \
        || { tail -n 30 "$work/debootstrap.log"; exit 1; }
    rm -rf "$work/rootfs/var/cache/apt/archives/"*.deb "$work/rootfs/var/lib/apt/lists/"*
    tar -C "$work/rootfs" -c . | $docker import - "$base_image" >/dev/null
    rm -rf "$work/rootfs"
    echo "built $base_image with debootstrap --variant=minbase bookworm ($mirror)"
fi

step "images: redis, labfleet runtime, prometheus"
mkdir -p "$work/ctx/bin"
for b in producer worker pve-sim; do
    [ -x "$bin_dir/$b" ] || { echo "missing $bin_dir/$b: build the binaries first" >&2; exit 1; }
    # Debug info is not needed in the image; stripping cuts the build context tenfold.
    strip -o "$work/ctx/bin/$b" "$bin_dir/$b"
done
cp -a data "$work/ctx/data"
$docker build -q -t labfleet:ci -f .ci/Dockerfile.runtime "$work/ctx" >/dev/null
$docker build -q -t local/redis:ci -f .ci/Dockerfile.redis .ci >/dev/null
$docker build -q -t local/prometheus:ci -f .ci/Dockerfile.prometheus .ci >/dev/null
$docker images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E '^(labfleet:ci|local/)' || true

step "compose config (shipped file + CI override, monitoring profile)"
docker-compose -f docker-compose.yml config -q
docker-compose "${files[@]}" --profile monitoring config -q

step "compose up --scale worker=3 (producer deploys data/compose/)"
compose_up=1
# Whatever an interrupted earlier run left behind goes first.
docker-compose "${files[@]}" -p "$project" --profile monitoring down -v --remove-orphans >/dev/null 2>&1 || true
# Every service but Grafana, which is not in Debian's archive (its config is checked above).
docker-compose "${files[@]}" -p "$project" --profile monitoring up -d --no-build --scale worker=3 \
    redis pve-sim worker producer prometheus
producer=$(docker-compose "${files[@]}" -p "$project" ps -q producer)
[ -n "$producer" ] || { echo "no producer container" >&2; exit 1; }
code=$(timeout 300 $docker wait "$producer" || echo timeout)
producer_log=$($docker logs "$producer" 2>&1)
echo "$producer_log" | tail -n 20
if [ "$code" != 0 ]; then
    echo "producer exited with '$code' (want 0)" >&2
    docker-compose "${files[@]}" -p "$project" logs --tail 40 >&2 || true
    exit 1
fi
if ! echo "$producer_log" | grep -Eq '(^|[^a-z_])done([^a-z_]|$)'; then
    echo "producer exited 0 but its output does not say the class is done" >&2
    exit 1
fi

step "workers: healthchecks and /metrics"
workers=$(docker-compose "${files[@]}" -p "$project" ps -q worker)
n=$(echo "$workers" | grep -c . || true)
[ "$n" = 3 ] || { echo "want 3 worker containers, have $n" >&2; exit 1; }
done_total=0
for w in $workers; do
    health=
    for _ in $(seq 1 60); do
        health=$($docker inspect --format '{{.State.Health.Status}}' "$w")
        [ "$health" = healthy ] && break
        sleep 0.5
    done
    [ "$health" = healthy ] || { echo "worker $w is $health, not healthy" >&2; exit 1; }
    metrics=$($docker exec "$w" curl -fsS http://127.0.0.1:9100/metrics)
    for m in labfleet_worker_jobs_total labfleet_queue_jobs labfleet_queue_up; do
        echo "$metrics" | grep -q "^$m" || { echo "worker $w: /metrics has no $m" >&2; exit 1; }
    done
    echo "$metrics" | grep -q '^labfleet_queue_up 1' || { echo "worker $w: labfleet_queue_up is not 1" >&2; exit 1; }
    # A worker that made no Proxmox request yet has no latency histogram; one must have.
    echo "$metrics" | grep -q '^labfleet_pve_request_duration_seconds_bucket' && histogram=1
    mine=$(echo "$metrics" | awk '/^labfleet_worker_jobs_total\{.*outcome="done"/ {s += $2} END {print s + 0}')
    echo "worker $($docker inspect --format '{{.Name}}' "$w"): $health, $mine jobs done"
    done_total=$((done_total + mine))
done
[ -n "${histogram:-}" ] || { echo "no worker serves labfleet_pve_request_duration_seconds" >&2; exit 1; }
queue_done=$($docker exec "$(echo "$workers" | head -n 1)" curl -fsS http://127.0.0.1:9100/metrics \
    | awk '/^labfleet_queue_jobs\{state="done"\}/ {print $2}')
echo "jobs done by the 3 workers: $done_total; the queue counts $queue_done"
[ "$done_total" = "$queue_done" ] || { echo "the workers' done jobs do not add up to the queue's" >&2; exit 1; }

step "prometheus (monitoring profile) scrapes every worker"
prom=$(docker-compose "${files[@]}" -p "$project" ps -q prometheus)
up=0
for _ in $(seq 1 60); do
    up=$($docker exec "$prom" sh -c 'curl -fsS "http://127.0.0.1:9090/api/v1/query?query=sum(up%7Bjob%3D%22labfleet-worker%22%7D)" 2>/dev/null' \
        | sed -n 's/.*"value":\[[^,]*,"\([0-9.]*\)"\].*/\1/p')
    [ "${up:-0}" = 3 ] && break
    sleep 1
done
[ "${up:-0}" = 3 ] || { echo "prometheus sees ${up:-0} of 3 workers up" >&2; docker logs --tail 30 "$prom" >&2; exit 1; }
rules=$($docker exec "$prom" sh -c 'curl -fsS http://127.0.0.1:9090/api/v1/rules' | grep -o '"name":"Labfleet[A-Za-z]*"' | sort -u | wc -l)
echo "prometheus: 3 of 3 workers up; $rules alert rules loaded"
[ "$rules" -ge 4 ] || { echo "prometheus loaded $rules alert rules, want at least 4" >&2; exit 1; }

step "compose down"
docker-compose "${files[@]}" -p "$project" --profile monitoring down -v --remove-orphans
compose_up=
echo "::: compose: all steps took $(($(date +%s) - t0)) s"
