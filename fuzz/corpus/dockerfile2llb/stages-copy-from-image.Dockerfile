FROM scratch
COPY --from=busybox /bin/busybox /bb
