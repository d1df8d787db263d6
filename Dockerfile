# svcd container image: a static-enough release binary on Debian slim, run as a non-root user.
#   docker build -t svcd .
#   docker run --rm -p 8600:8600/udp -p 9901:9901 svcd run --admin-listen 0.0.0.0:9901 ...
# (the admin API on a non-loopback address needs admin.token_file; see README)
FROM rust:1-bookworm AS build
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends protobuf-compiler libprotobuf-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin svcd \
 && target/release/svcd config default > /svcd.toml

FROM debian:bookworm-slim
RUN useradd --system --no-create-home --shell /usr/sbin/nologin --uid 10001 svcd \
 && install -d -o svcd -g svcd -m 0750 /run/svcd /etc/svcd
COPY --from=build /src/target/release/svcd /usr/bin/svcd
COPY --from=build /svcd.toml /etc/svcd/svcd.toml
USER svcd
# DNS, HTTP proxy, admin API (probes and metrics).
EXPOSE 8600/udp 8600/tcp 8080/tcp 9901/tcp
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["/usr/bin/svcd", "health"]
ENTRYPOINT ["/usr/bin/svcd"]
CMD ["run", "--config", "/etc/svcd/svcd.toml"]
