# syntax=docker/dockerfile:1
# cmk-proxy container image: a release build in a Rust image, run from a
# distroless image as a non-root user (no shell, no package manager).
#   docker build -t cmk-proxy .
#   docker run -v $PWD/policy.yaml:/etc/cmk-proxy/policy.yaml:ro -p 6432:6432 cmk-proxy
# The policy should set `listen: 0.0.0.0:6432` and `admin: {listen:
# 0.0.0.0:9187}` (the HEALTHCHECK asks /readyz there). Not built in CI:
# these machines have no Docker engine (docs/OPERATIONS.md, Container).

FROM rust:1.95-bookworm AS build
# pg_query builds PostgreSQL's parser and its bindings with bindgen (libclang).
RUN apt-get update \
 && apt-get install -y --no-install-recommends libclang-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY migrations migrations
# Cargo.toml names these targets; the release binary does not use them.
COPY benches benches
COPY integration/bench/approval_providers.rs integration/bench/approval_providers.rs
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin cmk-proxy \
 && cp target/release/cmk-proxy /cmk-proxy \
 && mkdir -p /state/spool

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /cmk-proxy /usr/local/bin/cmk-proxy
# Writable by the non-root user: the audit spool (audit.sink.spool_dir).
COPY --from=build --chown=65532:65532 /state /var/lib/cmk-proxy
USER 65532:65532
ENV CMK_PROXY_CONFIG=/etc/cmk-proxy/policy.yaml
EXPOSE 6432 9187
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
  CMD ["/usr/local/bin/cmk-proxy", "health", "--admin", "127.0.0.1:9187"]
ENTRYPOINT ["/usr/local/bin/cmk-proxy"]
CMD ["serve"]
