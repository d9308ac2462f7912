FROM busybox
COPY --link a.txt /l.txt
RUN cat /l.txt > /l2.txt
