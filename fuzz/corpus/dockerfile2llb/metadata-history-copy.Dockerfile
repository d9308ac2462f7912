FROM busybox
COPY a.txt /a.txt
