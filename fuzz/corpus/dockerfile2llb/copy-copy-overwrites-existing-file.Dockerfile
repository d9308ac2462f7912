FROM busybox
RUN echo old > /a.txt
COPY a.txt /a.txt
