FROM busybox
RUN --security=insecure sh -c 'mkdir -p /m && mount -t tmpfs none /m && echo mounted > /out && umount /m && rmdir /m'
