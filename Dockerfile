# dstack-mesh, one container per CVM next to the app:  docker build -t dstack-mesh .
#
# Two stages: a pinned Rust toolchain builds the release binary; the runtime is distroless
# (glibc, CA certificates, no shell, no package manager) and runs it as the nonroot user.
# Where no registry is reachable, point the two build arguments at local images that hold the
# same things (scripts/docker-bases makes them from Debian's packages).
# Reproducible: the same commit, builder and SOURCE_DATE_EPOCH give the same image ID; see
# docs/container.md for how to check that.
ARG BUILDER=docker.io/library/rust:1.95.0-slim-bookworm
ARG RUNTIME=gcr.io/distroless/cc-debian12:nonroot

FROM ${BUILDER} AS build
WORKDIR /src
# Only what the build reads: the workspace, its members, the lock file and the build settings.
COPY Cargo.toml Cargo.lock ./
COPY .cargo .cargo
COPY ratls ratls
COPY gateway-client gateway-client
COPY nginx-compat nginx-compat
COPY mesh mesh
COPY tests tests
# The etcd store (replicas) builds etcd's protos: protoc and its well-known types. jemalloc
# (the binary's allocator) builds with make.
RUN command -v protoc >/dev/null && [ -e /usr/include/google/protobuf/descriptor.proto ] \
    && command -v make >/dev/null \
 || (apt-get update && apt-get install -y --no-install-recommends protobuf-compiler libprotobuf-dev make \
     && rm -rf /var/lib/apt/lists/*)
# Debug info stays out of the image (symbols stay, so a panic's backtrace names functions).
ENV CARGO_PROFILE_RELEASE_STRIP=debuginfo \
    CARGO_NET_RETRY=5 \
    CARGO_INCREMENTAL=0
RUN cargo build --release --locked -p dstack-mesh --bin dstack-mesh --features etcd \
 && mkdir -p /out/store \
 && cp target/release/dstack-mesh /out/dstack-mesh \
 && rm -rf target

FROM ${RUNTIME}
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="dstack-mesh" \
      org.opencontainers.image.description="Attested identity, service mesh and public HTTPS for dstack apps, one sidecar per CVM" \
      org.opencontainers.image.source="https://github.com/dstack-mesh/dstack-mesh" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"
COPY --from=build /out/dstack-mesh /usr/local/bin/dstack-mesh
# The certificate store (public domains): mount a volume here; an empty named volume takes
# this directory's owner, so the nonroot user can write it with a read-only root.
COPY --from=build --chown=65532:65532 /out/store /var/lib/dstack-mesh
# In a container the app is another host on the compose network: the outbound proxy listens
# there (the network is the app's own; nothing is published). The inbound listener takes a
# port a non-root user may bind; compose publishes 443 to it. Admin and auth stay on loopback.
ENV DSTACK_MESH_INBOUND_LISTEN=0.0.0.0:8443 \
    DSTACK_MESH_CLIENT_LISTEN=0.0.0.0:8091
EXPOSE 8443 8091
USER 65532:65532
HEALTHCHECK --interval=5s --timeout=6s --start-period=60s --retries=3 \
  CMD ["/usr/local/bin/dstack-mesh", "health"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/dstack-mesh"]
CMD ["run"]
