FROM busybox
COPY --chown=user:user a.txt /c.txt
