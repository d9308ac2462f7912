FROM busybox
COPY a.txt
