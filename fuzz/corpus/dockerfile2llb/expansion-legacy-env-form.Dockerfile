FROM busybox
ENV A hello world
