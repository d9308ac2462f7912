FROM busybox AS broken
RUN exit 1
FROM busybox
RUN echo ok > /ok
