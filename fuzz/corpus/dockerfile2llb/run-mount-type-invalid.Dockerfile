FROM busybox
RUN --mount=type=volume,target=/v true
