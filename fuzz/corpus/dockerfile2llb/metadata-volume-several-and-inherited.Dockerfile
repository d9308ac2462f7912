FROM busybox AS base
VOLUME /data
FROM base
VOLUME ["/logs", "/cache"]
