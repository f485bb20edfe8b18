# syntax=docker/dockerfile:1
# Multi-stage build: compile with the pinned toolchain, run as non-root on a slim base.

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# Build dependencies first so they cache across source changes.
COPY Cargo.toml Cargo.lock ./
COPY benches benches
RUN mkdir src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && cargo build --release --locked --bin smart-fhir-proxy \
    && rm -rf src
COPY src src
COPY compartments compartments
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin smart-fhir-proxy

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin proxy
COPY --from=build /src/target/release/smart-fhir-proxy /usr/local/bin/smart-fhir-proxy
COPY tenants.example.json /etc/smart-fhir-proxy/tenants.example.json
USER 10001:10001
# 8080: FHIR clients. 9090: the admin listener (/metrics, /healthz, /readyz), for the
# load balancer and Prometheus only: do not publish it to clients.
ENV SFP_TENANTS=/etc/smart-fhir-proxy/tenants.json \
    SFP_LISTEN=0.0.0.0:8080 \
    SFP_ADMIN_LISTEN=0.0.0.0:9090 \
    SFP_LOG_FORMAT=json
EXPOSE 8080 9090
HEALTHCHECK --interval=30s --timeout=3s CMD ["curl", "-fsS", "-o", "/dev/null", "http://127.0.0.1:9090/healthz"]
ENTRYPOINT ["/usr/local/bin/smart-fhir-proxy"]
