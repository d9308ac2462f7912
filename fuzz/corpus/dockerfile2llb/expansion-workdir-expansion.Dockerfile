FROM busybox
ENV D=/data
WORKDIR $D/sub
