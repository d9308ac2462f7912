FROM busybox
RUN echo a \
# a comment between continuation lines
    b > /out
