FROM busybox
ARG A=def
RUN echo $A > /out
