# syntax=docker/dockerfile:1
#
# The endpoint picker image. It also carries the vLLM simulator, so a local
# cluster (manifests/overlays/kind) needs one image for both:
#   /usr/local/bin/epp       entrypoint: the picker (ports 9002, 9003, 9090)
#   /usr/local/bin/vllm-sim  the simulator (command override in the kind overlay)
#
#   docker build -t epp:dev .
#
# The build step is scripts/build-release.sh, which CI runs as well (no Docker
# engine there), so the image's cargo build is exercised on every change.

FROM docker.io/library/rust:1.95-bookworm AS builder
WORKDIR /src
COPY . .
# BuildKit cache mounts keep the crate registry and target/ between builds,
# so a source change recompiles only this workspace, not every dependency.
# target/ is a cache mount and vanishes after this step: copy the binaries
# out within it.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    scripts/build-release.sh \
 && mkdir -p /out \
 && cp target/release/epp target/release/vllm-sim /out/

# glibc + libgcc, no shell, no package manager; runs as uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /out/epp /usr/local/bin/epp
COPY --from=builder /out/vllm-sim /usr/local/bin/vllm-sim
USER 65532:65532
# ext_proc (gRPC, TLS), gRPC health + admin (plaintext), Prometheus /metrics.
EXPOSE 9002 9003 9090
ENTRYPOINT ["/usr/local/bin/epp"]
