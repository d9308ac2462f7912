FROM busybox AS base
LABEL a=1 b=1
FROM base
LABEL b=2
