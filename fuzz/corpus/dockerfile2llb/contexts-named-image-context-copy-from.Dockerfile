FROM scratch
COPY --from=tools /bin/busybox /bb
