FROM busybox
RUN --mount=type=bind,target=/ctx,rw sh -c 'echo changed > /ctx/a.txt && cat /ctx/a.txt > /out1'
RUN --mount=type=bind,target=/ctx cat /ctx/a.txt > /out2
