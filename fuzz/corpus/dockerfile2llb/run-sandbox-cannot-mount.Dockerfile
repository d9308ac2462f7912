FROM busybox
RUN mkdir -p /m && mount -t tmpfs none /m
