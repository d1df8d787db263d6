# svcd container image: the release binary on Debian slim, run as the non-root user svcd (uid and
# gid 10001, as deploy/kubernetes/daemonset.yaml runs it).
#   docker build --build-arg SVCD_REVISION=$(git rev-parse --short=12 HEAD) -t svcd .
#   docker run --rm -p 8600:8600/udp -p 8600:8600/tcp -p 8080:8080 -p 9901:9901 svcd
#   docker exec CONTAINER svcd list        # the admin API, on the container's unix socket
# DNS (8600), the HTTP proxy (8080) and probes and metrics (9901) listen on 0.0.0.0
# (deploy/container/svcd.toml). The admin API on the network needs a token, in a file uid 10001
# can read:
#   docker run --rm -p 9900:9900 -v "$PWD/admin.token:/etc/svcd/admin.token:ro" svcd run \
#     --config /etc/svcd/svcd.toml --admin-listen 0.0.0.0:9900 --admin-token-file /etc/svcd/admin.token
#   svcd list --admin 127.0.0.1:9900 --token-file admin.token
FROM rust:1-bookworm AS build
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends protobuf-compiler libprotobuf-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# .git is not in the build context (.dockerignore): build.rs takes the revision from here
# (`svcd version`, svcd_build_info{revision}).
ARG SVCD_REVISION=unknown
ENV SVCD_REVISION=${SVCD_REVISION}
# No debug info in the image (the release profile keeps line tables for profiling).
ENV CARGO_PROFILE_RELEASE_STRIP=debuginfo
RUN cargo build --release --locked --bin svcd

FROM debian:bookworm-slim
# iproute2: `ip`, for the DaemonSet's init container (the node-local DNS address);
# libcap2-bin: setcap, below.
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends iproute2 libcap2-bin \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 svcd \
 && useradd --system --no-create-home --shell /usr/sbin/nologin --uid 10001 --gid svcd svcd \
 && install -d -o svcd -g svcd -m 0750 /run/svcd \
 && install -d -o root -g svcd -m 0750 /etc/svcd
COPY --from=build /src/target/release/svcd /usr/bin/svcd
# DNS on :53 as uid 10001: a non-root process gets no capability from the runtime (no ambient
# set), so the binary carries the one it needs. A container must keep NET_BIND_SERVICE in its
# bounding set (Docker's default does; Kubernetes: capabilities.add) or cannot exec svcd (EPERM).
RUN setcap cap_net_bind_service=+ep /usr/bin/svcd
COPY deploy/container/svcd.toml /etc/svcd/svcd.toml
USER svcd
# DNS, HTTP proxy, probes and metrics (all on 0.0.0.0, see deploy/container/svcd.toml).
EXPOSE 8600/udp 8600/tcp 8080/tcp 9901/tcp
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["/usr/bin/svcd", "health"]
ENTRYPOINT ["/usr/bin/svcd"]
CMD ["run", "--config", "/etc/svcd/svcd.toml"]
