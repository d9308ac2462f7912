FROM busybox
ARG A=arg
ENV A=env
RUN echo $A > /out
