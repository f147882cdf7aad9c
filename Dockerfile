# syntax=docker/dockerfile:1
# One static, non-root image per component, for linux/amd64 and linux/arm64:
#
#   docker buildx build --platform linux/amd64,linux/arm64 --build-arg COMPONENT=operator \
#     -t ghcr.io/snooze-sh/operator:0.1.0 --push .
#   docker build --build-arg COMPONENT=activator -t ghcr.io/snooze-sh/activator:0.1.0 .
#
# The build stage runs on the builder's own platform and cross-compiles (musl, static)
# for the target platform, so a multi-arch build needs no emulation. It expects an
# amd64 builder (GitHub's runners, most laptops' Docker on x86).
FROM --platform=$BUILDPLATFORM rust:1.95-bookworm AS build
ARG TARGETARCH
ARG COMPONENT
# COMPONENT: operator, activator, or testapp (the small app of examples/app.yaml).
RUN case "$COMPONENT" in operator|activator|testapp) ;; \
      *) echo "--build-arg COMPONENT=operator, activator or testapp" >&2; exit 1 ;; esac
RUN case "$TARGETARCH" in \
      amd64) target=x86_64-unknown-linux-musl; pkgs=musl-tools ;; \
      arm64) target=aarch64-unknown-linux-musl; pkgs=gcc-aarch64-linux-gnu ;; \
      *) echo "unsupported platform: $TARGETARCH" >&2; exit 1 ;; \
    esac \
 && apt-get update && apt-get install -y --no-install-recommends $pkgs \
 && rm -rf /var/lib/apt/lists/* \
 && rustup target add "$target" && echo "$target" > /target
# ring compiles C: the cross compiler and linker for arm64.
ENV CC_aarch64_unknown_linux_musl=aarch64-linux-gnu-gcc \
    CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_LINKER=aarch64-linux-gnu-gcc
WORKDIR /src
COPY . .
RUN target=$(cat /target) \
 && case "$COMPONENT" in testapp) pkg=snooze-e2e ;; *) pkg="snooze-$COMPONENT" ;; esac \
 && cargo build --release --locked --target "$target" -p "$pkg" --bin "snooze-$COMPONENT" \
 && cp "target/$target/release/snooze-$COMPONENT" /app

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /app /app
USER 65532:65532
ENTRYPOINT ["/app"]
