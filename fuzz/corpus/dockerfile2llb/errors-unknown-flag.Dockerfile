FROM busybox
COPY --nope a.txt /
