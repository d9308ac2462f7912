FROM busybox
RUN --mount=type=secret,id=absent sh -c 'test ! -e /run/secrets/absent && echo skipped > /out'
