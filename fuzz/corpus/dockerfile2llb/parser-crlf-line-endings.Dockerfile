FROM busybox
RUN echo crlf > /out
