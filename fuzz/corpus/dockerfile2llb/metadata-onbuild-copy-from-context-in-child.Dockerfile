FROM busybox AS base
ONBUILD COPY a.txt /from-onbuild.txt
FROM base
