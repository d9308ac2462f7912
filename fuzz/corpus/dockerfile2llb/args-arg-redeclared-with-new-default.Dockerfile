ARG V=global
FROM busybox
ARG V=local
RUN echo $V > /out
