# Build stage: the release binary.
FROM rust:1-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY examples ./examples
RUN cargo build --release --locked --bin mqtt-warden

# Runtime stage: a small image with the binary, running as an unprivileged user.
FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --no-create-home warden
COPY --from=build /src/target/release/mqtt-warden /usr/local/bin/mqtt-warden
COPY policies /etc/mqtt-warden/policies
USER warden
EXPOSE 1883 9100
# Needs `admin: { bind: "0.0.0.0:9100" }` (or 127.0.0.1) in the config.
HEALTHCHECK --interval=10s --timeout=5s --start-period=5s \
  CMD ["/usr/local/bin/mqtt-warden", "probe", "--address", "127.0.0.1:9100", "--path", "/healthz"]
ENTRYPOINT ["/usr/local/bin/mqtt-warden"]
CMD ["run", "--config", "/etc/mqtt-warden/warden.yaml"]
