FROM busybox
RUN --mount=type=bind,target=/ctx cat /ctx/a.txt > /out
