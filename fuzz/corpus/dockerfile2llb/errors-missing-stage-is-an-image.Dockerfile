FROM busybox
COPY --from=nostage /x /x
