# sluice: the daemon plus the example plugins, on a small Debian base.
#
#   docker build -t sluice .
#   docker run --rm -p 127.0.0.1:9595:9595 --read-only -v sluice-data:/var/lib/sluice \
#     -e SLUICE_ADMIN_TOKEN="$(openssl rand -hex 16)" sluice
#
# The admin API listens on all interfaces inside the container, so it needs
# a token (SLUICE_ADMIN_TOKEN, at least 16 characters): without one sluice
# refuses to start rather than let anyone who reaches the port publish and
# replay. The healthcheck uses /readyz, which needs no token.
#
# Config and plugins are volumes: mount your own over /etc/sluice and
# /opt/sluice/plugins (changes there are hot-reloaded). Data (the embedded
# broker, idempotency records, the compiled-plugin cache) goes to
# /var/lib/sluice, the one place the process writes.

FROM rust:1.95-bookworm AS build
RUN rustup target add wasm32-wasip2
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p sluice \
 && cargo build --release --locked --target wasm32-wasip2 -p order-processor -p pricing -p noop \
 && mkdir -p /out/plugins \
 && cp target/release/sluice /out/ \
 && cp target/wasm32-wasip2/release/order_processor.wasm target/wasm32-wasip2/release/pricing.wasm \
       target/wasm32-wasip2/release/noop.wasm /out/plugins/

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --home-dir /var/lib/sluice --no-create-home sluice \
 && mkdir -p /var/lib/sluice /etc/sluice /opt/sluice/plugins \
 && chown sluice:sluice /var/lib/sluice
COPY --from=build /out/sluice /usr/local/bin/sluice
COPY --from=build /out/plugins/ /opt/sluice/plugins/
COPY config/ /etc/sluice/
USER sluice
WORKDIR /var/lib/sluice
ENV SLUICE_CONFIG=/etc/sluice/sluice.toml \
    SLUICE_DATA_DIR=/var/lib/sluice \
    SLUICE_PLUGIN_DIR=/opt/sluice/plugins \
    SLUICE_ADMIN=0.0.0.0:9595
VOLUME ["/var/lib/sluice"]
EXPOSE 9595
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s CMD ["sluice", "health"]
# SIGTERM drains in-flight messages within `shutdown_grace`.
STOPSIGNAL SIGTERM
ENTRYPOINT ["sluice"]
CMD ["run"]
