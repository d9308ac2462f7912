FROM busybox AS a
COPY --from=a /bin/busybox /x
