FROM busybox
COPY --chown=nosuchuser a.txt /
