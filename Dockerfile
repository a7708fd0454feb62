# syntax=docker/dockerfile:1
# herald's container image: herald-worker and herald-coordinator on a distroless, non-root base.
#
#   docker build -t herald:0.1.0 .
#   docker run --rm herald:0.1.0 herald-worker --help
#
# The Helm chart (helm/herald) runs /usr/local/bin/herald-{coordinator,worker} as UID 65532
# with a read-only root filesystem; the image needs nothing writable.

# --- build ------------------------------------------------------------------------------------
# The workspace's rust-version; bookworm matches the runtime's glibc.
FROM rust:1.95-bookworm AS build
# etcd-client's build script runs protoc and needs the well-known types.
RUN apt-get update \
 && apt-get install -y --no-install-recommends protobuf-compiler libprotobuf-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p herald-worker -p herald-coordinator --bins \
 && install -D -m 0755 -t /out target/release/herald-worker target/release/herald-coordinator

# --- runtime ----------------------------------------------------------------------------------
# glibc + libgcc, CA certificates and tzdata; no shell, no package manager. TLS is rustls.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/ /usr/local/bin/
USER 65532:65532
# Coordinator API and metrics; worker metrics.
EXPOSE 8080 9100
CMD ["/usr/local/bin/herald-coordinator", "--help"]
