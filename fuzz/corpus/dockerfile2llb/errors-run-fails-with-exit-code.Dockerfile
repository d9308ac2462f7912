FROM busybox
RUN exit 3
