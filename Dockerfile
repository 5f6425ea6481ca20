# syntax=docker/dockerfile:1
#
# ringtunnel in a container: Debian's Rust image builds it, a slim Debian image runs it as a
# non-root user, with a health check on the admin endpoint's /health.
#
#   docker build --build-arg RINGTUNNEL_COMMIT="$(git rev-parse --short=12 HEAD)" -t ringtunnel .
#   docker run -d --name ringtunnel-relay --stop-timeout 45 \
#     -e RINGTUNNEL_SECRET="$(openssl rand -hex 32)" \
#     -p 7843:7843 -p 20000-20009:20000-20009 -v ringtunnel-state:/var/lib/ringtunnel \
#     ringtunnel relay --admin 127.0.0.1:7844 --port-range 20000-20009
#   docker logs ringtunnel-relay | grep ready      # the fingerprint agents pin
#
# compose.yaml runs a relay, an agent and a web server together. An agent alone:
#   docker run -d -e RINGTUNNEL_SECRET=... --no-healthcheck ringtunnel \
#     agent --relay 203.0.113.7 --relay-fingerprint 6f0c... --local 192.168.1.10:8000
#
# io_uring: Docker's default seccomp profile (since Docker 25) refuses io_uring_setup, so in a
# container the relay runs its tokio backend and says so (`backend=tokio` in its ready line).
# For the io_uring backend, run it with `--security-opt seccomp=unconfined` or a profile that
# allows io_uring_setup, io_uring_enter and io_uring_register.

FROM rust:1-slim-bookworm AS build
WORKDIR /src
COPY . .
# The commit for `ringtunnel --version` (the build context has no .git).
ARG RINGTUNNEL_COMMIT=unknown
# The same command as the README's install, into /out (tests/install.rs runs this line).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo install --locked --path . --root /out

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/ringtunnel --no-create-home \
        --shell /usr/sbin/nologin ringtunnel \
    && install -d -m 0700 -o ringtunnel -g ringtunnel /var/lib/ringtunnel
COPY --from=build /out/bin/ringtunnel /usr/local/bin/ringtunnel
# Numeric, so an orchestrator can tell it is not root (runAsNonRoot).
USER 10001:10001
# The certificate and key live here: keep it on a volume, or agents must learn a new
# fingerprint after every container is replaced.
ENV RINGTUNNEL_STATE_DIR=/var/lib/ringtunnel
VOLUME ["/var/lib/ringtunnel"]
# Control and data connections from agents; public ports are published per deployment.
EXPOSE 7843
# Needs the admin endpoint on 127.0.0.1:7844 (as in CMD); an agent's container has none:
# run it with --no-healthcheck (compose.yaml does).
HEALTHCHECK --interval=30s --timeout=6s --start-period=10s --retries=3 \
    CMD ["ringtunnel", "status", "--health"]
ENTRYPOINT ["ringtunnel"]
CMD ["relay", "--admin", "127.0.0.1:7844"]
