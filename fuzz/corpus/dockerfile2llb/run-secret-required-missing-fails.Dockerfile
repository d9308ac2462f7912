FROM busybox
RUN --mount=type=secret,id=needed,required=true true
