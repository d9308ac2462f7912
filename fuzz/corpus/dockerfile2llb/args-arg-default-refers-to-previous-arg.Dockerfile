FROM busybox
ARG A=x
ARG B=${A}y
RUN echo $B > /out
