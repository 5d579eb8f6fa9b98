# syntax=docker/dockerfile:1
# labfleet's image for docker-compose.yml: producer, worker and pve-sim in one small image.
# Stage 1 builds the three binaries (release); stage 2 is a slim Debian with only them,
# the data folders and curl (the worker's healthcheck). Build: docker build -t labfleet .

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# The registry and target caches survive between builds (BuildKit); the binaries are
# copied out of the cached target dir in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --bin producer --bin worker --bin pve-sim \
    && mkdir -p /out \
    && cp target/release/producer target/release/worker target/release/pve-sim /out/

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --home-dir /data --shell /usr/sbin/nologin labfleet
COPY --from=build /out/ /usr/local/bin/
# data/compose is the compose lab; data/sim the simulator's cluster and DEMO-ONLY cert.
COPY --chown=labfleet:labfleet data /data
USER labfleet
WORKDIR /data
CMD ["producer", "--help"]
