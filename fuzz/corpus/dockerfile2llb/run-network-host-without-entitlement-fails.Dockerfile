FROM busybox
RUN --network=host true
