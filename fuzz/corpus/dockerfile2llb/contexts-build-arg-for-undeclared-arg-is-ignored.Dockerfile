FROM busybox
RUN echo "[$NOTDECLARED]" > /out
