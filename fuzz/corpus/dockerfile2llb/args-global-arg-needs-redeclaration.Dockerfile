ARG G=glob
FROM busybox
RUN echo "[$G]" > /a
ARG G
RUN echo "[$G]" > /b
