FROM busybox
COPY --chown=1 a.txt /c.txt
