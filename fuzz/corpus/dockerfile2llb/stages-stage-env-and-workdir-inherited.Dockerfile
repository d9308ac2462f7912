FROM busybox AS base
ENV X=1
WORKDIR /w
FROM base
RUN echo $X > x
