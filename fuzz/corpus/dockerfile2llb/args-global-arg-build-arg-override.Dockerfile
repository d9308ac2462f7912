ARG G=glob
FROM busybox
ARG G
RUN echo "[$G]" > /b
