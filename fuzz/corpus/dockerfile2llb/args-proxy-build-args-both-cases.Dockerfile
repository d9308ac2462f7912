FROM busybox
RUN echo "$https_proxy|$HTTPS_PROXY|$no_proxy|$NO_PROXY|$ftp_proxy|$ALL_PROXY" > /p
