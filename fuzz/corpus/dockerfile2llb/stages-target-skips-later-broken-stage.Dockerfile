FROM busybox AS good
RUN echo ok > /ok
FROM busybox
RUN exit 1
