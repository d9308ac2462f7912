FROM busybox
RUN --mount=type=cache,id=conf-shared,target=/one echo shared > /one/f
RUN --mount=type=cache,id=conf-shared,target=/two cat /two/f > /out
