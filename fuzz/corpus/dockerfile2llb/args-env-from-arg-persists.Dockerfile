FROM busybox
ARG A=1
ENV B=$A
