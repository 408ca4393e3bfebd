# etcd 3.4 from Debian's etcd-server package, for scripts/deploy-e2e.sh where no registry image can
# be pulled (the Kubernetes manifests use the upstream image, pinned by tag).
ARG BASE=debian:bookworm-slim
FROM ${BASE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends etcd-server \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /var/lib/etcd && chown 10002:10002 /var/lib/etcd
USER 10002:10002
ENTRYPOINT ["/usr/bin/etcd"]
