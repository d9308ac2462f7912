FROM busybox
COPY --chmod=999 a.txt /
