FROM busybox
RUN --mount=type=ssh,required=true true
