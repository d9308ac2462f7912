FROM busybox AS a
ARG X=a
FROM busybox
RUN echo "[$X]" > /out
