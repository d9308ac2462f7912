FROM busybox
LABEL a=1
WORKDIR /w
