FROM busybox AS base
ONBUILD RUN true
FROM base
