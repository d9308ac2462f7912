FROM busybox
ARG A=1
RUN env > /env
