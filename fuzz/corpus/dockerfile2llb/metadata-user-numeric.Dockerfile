FROM busybox
USER 1000:1000
RUN id -u > /tmp/uid
