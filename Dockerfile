# syntax=docker/dockerfile:1
#
# tokenvault container image.
#
#   docker build -t tokenvault .
#   docker run --rm tokenvault keys generate           # needs no settings
#   docker run ... tokenvault                          # runs `tokenvault serve`
#   docker compose up --build                          # PostgreSQL, a key, migrate, serve (docker-compose.yml)
#
# Settings come from the environment (see README.md): at least DATABASE_URL and
# TOKENVAULT_ENCRYPTION_KEYS, or TOKENVAULT_ENCRYPTION_KEYS_FILE pointing to a mounted secret.
#
# The internal listener (token API, admin API, metrics) defaults to 127.0.0.1:8081, which inside a
# container is reachable only from that container. Set TOKENVAULT_INTERNAL_ADDR=0.0.0.0:8081 so that
# other containers can reach it, and publish port 8081 only on a private network or on the host's
# loopback (127.0.0.1:8081:8081), NEVER publicly. Only port 8080 (the callback) faces the internet.

FROM rust:1.95-bookworm AS builder
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# The workspace's other member (the tokenvault-client crate): cargo reads every member's manifest, even
# when building only the service's binary.
COPY client ./client
# The migrations are embedded in the binary at compile time (sqlx::migrate!).
COPY migrations ./migrations
# Cache the registry and the target directory between builds. The binary is copied out of the cache
# mount within the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin tokenvault \
    && cp target/release/tokenvault /usr/local/bin/tokenvault

FROM debian:bookworm-slim
# CA certificates: the JWKS and the token endpoint are called over https.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
# A fixed, non-root uid: secret files mounted into the container must be readable by uid 10001.
RUN groupadd --system --gid 10001 tokenvault \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin tokenvault
COPY --from=builder /usr/local/bin/tokenvault /usr/local/bin/tokenvault
USER 10001:10001
# 8080: public listener (POST /callbacks/trackunit, health).
# 8081: internal listener (tokens, admin, metrics, health); private networks only.
EXPOSE 8080 8081
# tokenvault stops gracefully on SIGTERM (the default stop signal): in-flight requests get
# TOKENVAULT_SHUTDOWN_GRACE_SECS (default 30 s). Give the container longer than that to stop
# (docker stop -t, compose stop_grace_period, Kubernetes terminationGracePeriodSeconds).
# No HEALTHCHECK here: the same image also runs migrate and sandbox. Use `tokenvault healthcheck
# [--internal]` (no curl needed) in docker-compose.yml or your orchestrator; see docs/DEPLOYMENT.md.
ENTRYPOINT ["tokenvault"]
CMD ["serve"]
