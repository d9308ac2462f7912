FROM busybox
RUN --mount=type=secret,id=tok cat /run/secrets/tok > /out
