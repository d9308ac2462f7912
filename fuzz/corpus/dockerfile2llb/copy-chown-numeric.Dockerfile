FROM busybox
COPY --chown=1000:1000 a.txt /c.txt
