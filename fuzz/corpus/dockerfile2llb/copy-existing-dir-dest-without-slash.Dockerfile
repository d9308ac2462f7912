FROM busybox
RUN mkdir /existing
COPY a.txt /existing
