# Images of the hub and the agent, from one build:
#   docker build --target operator -t ghcr.io/brokkr-dev/brokkr-operator:0.1.0 .
#   docker build --target agent    -t ghcr.io/brokkr-dev/brokkr-agent:0.1.0 .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p brokkr-operator -p brokkr-agent

FROM gcr.io/distroless/cc-debian12:nonroot AS operator
COPY --from=build /src/target/release/brokkr-operator /usr/local/bin/brokkr-operator
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/brokkr-operator"]

FROM gcr.io/distroless/cc-debian12:nonroot AS agent
COPY --from=build /src/target/release/brokkr-agent /usr/local/bin/brokkr-agent
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/brokkr-agent"]
