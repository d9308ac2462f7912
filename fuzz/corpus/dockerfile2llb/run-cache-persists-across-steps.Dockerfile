FROM busybox
RUN --mount=type=cache,target=/cache-a echo kept > /cache-a/x
RUN --mount=type=cache,target=/cache-a cat /cache-a/x > /out
