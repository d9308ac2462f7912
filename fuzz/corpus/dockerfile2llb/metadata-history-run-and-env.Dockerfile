FROM busybox
ENV A=1
RUN true
