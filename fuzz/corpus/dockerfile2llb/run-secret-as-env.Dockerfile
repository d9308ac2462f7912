FROM busybox
RUN --mount=type=secret,id=tok,env=TOKEN sh -c 'echo "$TOKEN" > /out'
