FROM scratch AS empty
FROM busybox
RUN --mount=type=bind,from=busybox,source=/bin,target=/bb /bb/busybox echo via-image > /out
