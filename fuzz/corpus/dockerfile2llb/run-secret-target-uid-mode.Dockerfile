FROM busybox
RUN --mount=type=secret,id=tok,target=/etc/app/token,uid=1000,mode=0400 stat -c "%u %a" /etc/app/token > /out
