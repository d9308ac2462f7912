FROM busybox
USER nobody
RUN id -u > /tmp/uid
