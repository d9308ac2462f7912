FROM busybox
RUN --mount=type=cache,id=conf-shr,target=/a,sharing=shared --mount=type=cache,id=conf-prv,target=/b,sharing=private --mount=type=cache,id=conf-lck,target=/c,sharing=locked sh -c 'touch /a/x /b/x /c/x && echo ok > /out'
