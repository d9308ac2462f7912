FROM busybox
RUN --mount=type=bind,target=/ctx sh -c 'if touch /ctx/new 2>/dev/null; then echo rw; else echo ro; fi > /out'
