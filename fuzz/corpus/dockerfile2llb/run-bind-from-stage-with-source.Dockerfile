FROM busybox AS src
RUN mkdir -p /d && echo staged > /d/f
FROM busybox
RUN --mount=type=bind,from=src,source=/d,target=/m cat /m/f > /out
