FROM busybox
RUN --mount=type=bind,source=sub/f.txt,target=/etc/f.txt cat /etc/f.txt > /out
