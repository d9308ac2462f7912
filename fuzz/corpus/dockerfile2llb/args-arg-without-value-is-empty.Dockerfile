FROM busybox
ARG A
RUN echo "[$A]" > /out
