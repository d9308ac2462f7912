FROM busybox
ARG SECRET=s
RUN true
