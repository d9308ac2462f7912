FROM scratch
COPY --from=docker.io/library/busybox:latest /bin/busybox /bb
